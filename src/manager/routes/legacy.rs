//! The original project's later agents (qnHackathon 1.2.0, `binproxy.py`
//! and `bin-proxy.sh`; their dialect is described in `manager/legacy.rs`)
//! served unchanged beside bin-proxy: small hooks in the dispatcher call
//! these. What they need, and what this gives them:
//!
//! * `GET keepalive` with no node at all (the shell agent, under `set -e`,
//!   where any 4xx aborts its run): `204 No Content`. The empty body is what
//!   makes it post its facts, which is how it says who it is.
//! * `POST keepalive` with `{nodeName|node_id, cpuArch, osRelease,
//!   binProxyVersion}`: the node's facts, merged into its record (what it
//!   runs and its progress are kept); unchanged facts only refresh lastSeen.
//! * `GET bins/NAME`: `sha256` and `sha256sum` at the top level, beside
//!   the envelope (they do not read `data`).
//! * `POST bins/NAME` with a sha256: stored as what the node runs, mapped to
//!   the md5 of the build when this server published it (the current build
//!   of either slot, or a build a rollout record remembers); otherwise kept
//!   as a sha256 of its own with no md5 (the node then counts as behind).
//! * `POST bins/NAME/progress`: the latest report per node and binary, in
//!   the registry; `success` also says what the node now runs.
//!
//! Reports and progress need a registered node and a published binary
//! (404 otherwise): nothing here creates nodes or entries for names nobody
//! published, so their number stays bounded. Registrations, reports and
//! progress pass the same checks as ours: field bounds, `maxNodes`, the
//! per-address rate, admission, and the node's token (these agents send
//! none, so `requireNodeTokens` refuses them for a node that has one).

use super::nodes::node_token;
use super::{fail, ok, App, Query};
use crate::json::Value;
use crate::log;
use crate::manager::http::{Request, Response};
use crate::manager::legacy::{self, Progress, Status};
use crate::manager::registry::{Node, Registered};
use crate::manager::store::valid_name;
use crate::protocol::BinaryFact;

/// The `bins/NAME` answer with the sha256 also at the top level, where the
/// legacy agents read it (`sha256sum` first for the Python one, `.sha256`
/// for the shell one). No sha256, no top-level keys: never an empty hash.
pub(super) fn bin_answer(data: Value, sha256: &str) -> Response {
    if sha256.is_empty() {
        return ok(data);
    }
    let body = Value::obj([
        ("code", Value::int(200)),
        ("message", Value::str("Success")),
        ("data", data),
        ("sha256", Value::str(sha256)),
        ("sha256sum", Value::str(sha256)),
    ]);
    Response::json(200, body.to_compact())
}

/// `GET keepalive` naming no node: nothing to say, and an empty body so
/// that the shell agent posts its facts next.
pub(super) fn anonymous_keepalive() -> Response {
    Response {
        status: 204,
        headers: Vec::new(),
        body: crate::manager::http::Payload::Bytes(Vec::new()),
    }
}

/// What a legacy agent's sha256 names here.
enum Named {
    /// A build this server published: its md5.
    Build(String),
    /// The binary is published, but no build of it that the server still
    /// knows has this sha256.
    Unknown,
    /// Nothing is published under this name.
    NoBinary,
}

impl App {
    /// `bins/NAME/progress`; `None` on an event loop (it writes, so a
    /// worker answers).
    pub(super) fn legacy_progress(
        &self,
        req: &mut Request,
        bin: &str,
        on_loop: bool,
    ) -> Option<Response> {
        if on_loop {
            return None;
        }
        if req.method != "POST" {
            return Some(fail(405, "method not allowed here"));
        }
        Some(self.progress(req, bin))
    }

    /// A legacy registration (see [`legacy::is_registration`]), or `None`
    /// for one of ours.
    pub(super) fn legacy_register(
        &self,
        req: &Request,
        doc: &Value,
        q: &Query,
    ) -> Option<Response> {
        if !legacy::is_registration(doc) {
            return None;
        }
        let r = match legacy::registration(doc) {
            Ok(r) => r,
            Err(msg) => return Some(fail(400, &msg)),
        };
        let name = match q.node.clone().unwrap_or(r.node) {
            n if n.is_empty() => {
                return Some(fail(400, "missing ?node=NAME, \"node_id\" or \"nodeName\""))
            }
            n if !valid_name(&n) => return Some(fail(400, "invalid node name")),
            n => n,
        };
        // The same bounds, rate and token checks as a registration of ours.
        let facts = Node {
            name: name.clone(),
            cpu_arch: r.cpu_arch.clone(),
            os_release: r.os_release.clone(),
            proxy_version: r.proxy_version.clone(),
            ..Node::default()
        };
        if let Err(msg) = crate::manager::limits::check_registration(&facts) {
            return Some(fail(400, &msg));
        }
        if let Err(resp) = self.within_rate(req, &name) {
            return Some(resp);
        }
        let stored = self.registry.update_node(
            &name,
            &log::utc_now(),
            true,
            node_token(req),
            &self.policy,
            |node| {
                node.cpu_arch = r.cpu_arch;
                node.os_release = r.os_release;
                node.proxy_version = r.proxy_version;
            },
        );
        Some(self.registered(req, &name, stored))
    }

    /// A legacy report (see [`legacy::is_report`]), or `None` for one of ours.
    pub(super) fn legacy_report(
        &self,
        req: &Request,
        doc: &Value,
        bin: &str,
        q: &Query,
    ) -> Option<Response> {
        if !legacy::is_report(doc) {
            return None;
        }
        let r = match legacy::report(doc) {
            Ok(r) => r,
            Err(msg) => return Some(fail(400, &msg)),
        };
        let node = match self.reporting_node(q.node.as_deref(), &r.node) {
            Ok(n) => n,
            Err(resp) => return Some(resp),
        };
        let md5 = match self.named(bin, &node.cpu_arch, &r.sha256) {
            Named::Build(md5) => md5,
            Named::Unknown => String::new(),
            Named::NoBinary => return Some(fail(404, "binary not found")),
        };
        let stored = self.registry.update_node(
            &node.name,
            &log::utc_now(),
            false,
            node_token(req),
            &self.policy,
            |n| runs(n, bin, &r.sha256, &md5, &log::utc_now()),
        );
        Some(match stored {
            Ok(Registered::Refused(check)) => fail(403, &check.refusal(&node.name)),
            Ok(Registered::Stored { .. }) => ok(Value::obj([
                ("node", Value::str(&node.name)),
                ("name", Value::str(bin)),
                ("hash", Value::str(&md5)),
                ("sha256", Value::str(&r.sha256)),
            ])),
            Ok(_) => fail(404, "node not found"),
            Err(e) => super::not_stored("the report", &e),
        })
    }

    fn progress(&self, req: &mut Request, bin: &str) -> Response {
        let doc = match super::json_body(req) {
            Ok(doc) => doc,
            Err(resp) => return resp,
        };
        let p = match legacy::progress(&doc) {
            Ok(p) => p,
            Err(msg) => return fail(400, &msg),
        };
        let node = match self.reporting_node(None, &p.node) {
            Ok(n) => n,
            Err(resp) => return resp,
        };
        let target_md5 = match self.named(bin, &node.cpu_arch, &p.target_hash) {
            Named::Build(md5) => md5,
            Named::Unknown => String::new(),
            Named::NoBinary => return fail(404, "binary not found"),
        };
        let now = log::utc_now();
        let record = Progress {
            status: p.status,
            target_hash: p.target_hash.clone(),
            target_md5: target_md5.clone(),
            at: now.clone(),
            processing_time: p.processing_time,
        };
        let token = node_token(req);
        let stored = self
            .registry
            .update_node(&node.name, &now, false, token, &self.policy, |n| {
                if p.status == Status::Success {
                    runs(n, bin, &p.target_hash, &target_md5, &now);
                } else if !n.binaries.iter().any(|b| b.name == bin) {
                    // Shown in the fleet view before it ever ran the binary.
                    n.binaries.push(BinaryFact {
                        name: bin.to_string(),
                        version: "latest".into(),
                        hash: String::new(),
                    });
                }
                n.legacy.entry(bin.to_string()).or_default().progress = Some(record);
            });
        match stored {
            Ok(Registered::Refused(check)) => fail(403, &check.refusal(&node.name)),
            Ok(Registered::Stored { .. }) => ok(Value::obj([
                ("nodeName", Value::str(&node.name)),
                ("binName", Value::str(bin)),
                ("status", Value::str(p.status.word())),
            ])),
            Ok(_) => fail(404, "node not found"),
            Err(e) => super::not_stored("the progress report", &e),
        }
    }

    /// The registered node a report names: `?node=` first, else the body's.
    fn reporting_node(&self, query: Option<&str>, body_node: &str) -> Result<Node, Response> {
        let name = query.unwrap_or(body_node);
        if name.is_empty() {
            return Err(fail(400, "missing ?node=NAME, \"node_id\" or \"nodeName\""));
        }
        if !valid_name(name) {
            return Err(fail(400, "invalid node name"));
        }
        match self.registry.node(name) {
            Some(n) => Ok(Node::clone(&n)),
            None => Err(fail(
                404,
                "node not found: register it first (POST keepalive)",
            )),
        }
    }

    /// Which build of `bin` has this hash (a sha256; an md5 from an older
    /// agent is compared as one): the current one of the plain slot (what
    /// these agents are served) or of the node's arch slot, or one that a
    /// rollout record of the binary remembers (the builds it went from and
    /// to, kept in binDir/.builds).
    fn named(&self, bin: &str, arch: &str, hash: &str) -> Named {
        let arch = Some(arch).filter(|a| valid_name(a));
        let is = |md5: &str, sha256: &str| {
            let ours = if legacy::is_sha256(hash) { sha256 } else { md5 };
            !ours.is_empty() && crate::hash::same(ours, hash)
        };
        let mut published = false;
        for slot_arch in [None, arch] {
            if let Ok(Some(b)) = self.store.get(bin, slot_arch, None) {
                published = true;
                if is(&b.md5, &b.sha256) {
                    return Named::Build(b.md5);
                }
            }
        }
        for r in self.registry.rollouts().iter().filter(|r| r.name == bin) {
            published = true;
            for b in [&r.to, &r.from] {
                if is(&b.md5, &b.sha256) {
                    return Named::Build(b.md5.clone());
                }
            }
        }
        if published {
            Named::Unknown
        } else {
            Named::NoBinary
        }
    }
}

/// Records that node `n` runs the build with this sha256 (and md5, "" when
/// the server does not know it) for `bin`.
fn runs(n: &mut Node, bin: &str, sha256: &str, md5: &str, now: &str) {
    let hash_changed = !n.hash_of(bin).eq_ignore_ascii_case(md5);
    let entry = n.legacy.entry(bin.to_string()).or_default();
    let changed = hash_changed || entry.sha256 != sha256;
    entry.sha256 = sha256.to_string();
    match n.binaries.iter_mut().find(|b| b.name == bin) {
        Some(b) => b.hash = md5.to_string(),
        None => n.binaries.push(BinaryFact {
            name: bin.to_string(),
            version: "latest".into(),
            hash: md5.to_string(),
        }),
    }
    if changed || !n.since.contains_key(bin) {
        n.since.insert(bin.to_string(), now.to_string());
    }
}
