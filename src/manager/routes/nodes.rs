//! The answers about nodes: heartbeats and registrations (`keepalive`),
//! hash reports (`POST bins/NAME?node=`), the admins' `accept` and `reset`,
//! and the admission check in front of what is served. Each writes only
//! what the node's token allows ([`crate::manager::identity`]), within the
//! bounds of [`crate::manager::limits`].

use super::{bearer, fail, json_body, ok, same_secret, App, Query};
use crate::json::Value;
use crate::log;
use crate::manager::config::Admission;
use crate::manager::http::{client_of, Request, Response};
use crate::manager::identity::{self, TokenCheck};
use crate::manager::limits;
use crate::manager::registry::{Node, Registered, Reported};
use std::time::Instant;

/// Retry-After of a 503 for a full registry: an admin has to act first.
const FULL_RETRY_SECS: u64 = 600;

impl App {
    /// `GET keepalive?node=`: the node's record, lastSeen refreshed.
    pub(super) fn keepalive_get(&self, req: &Request, q: &Query) -> Response {
        let Some(node) = &q.node else {
            return super::legacy::anonymous_keepalive(); // the original shell agent's
        };
        let token = node_token(req);
        match self
            .registry
            .heartbeat(node, token, &self.policy, &log::utc_now())
        {
            Ok(Some(record)) => ok(record.to_json()),
            Ok(None) => fail(404, "node not found"),
            Err(check) => fail(403, &check.refusal(node)),
        }
    }

    /// `POST keepalive?node=`: a registration (or refresh), checked against
    /// the bounds, the node's token, the registry's size and, for a new
    /// node, the address's rate.
    pub(super) fn keepalive_post(&self, req: &mut Request, q: &Query) -> Response {
        let doc = match json_body(req) {
            Ok(doc) => doc,
            Err(resp) => return resp,
        };
        if let Some(resp) = self.legacy_register(req, &doc, q) {
            return resp;
        }
        let mut node = match Node::from_json(&doc) {
            Ok(n) => n,
            Err(msg) => return fail(400, &msg),
        };
        match (&q.node, node.name.is_empty()) {
            (Some(name), _) => node.name = name.clone(),
            (None, false) => {}
            (None, true) => return fail(400, "missing ?node=NAME"),
        }
        if !crate::manager::store::valid_name(&node.name) {
            return fail(400, "invalid node name");
        }
        if let Err(msg) = limits::check_registration(&node) {
            return fail(400, &msg);
        }
        if let Err(resp) = self.within_rate(req, &node.name) {
            return resp;
        }
        let fresh = match identity::new_token() {
            Ok(t) => t,
            Err(e) => return fail(500, &format!("could not make a node token: {e}")),
        };
        let name = node.name.clone();
        let token = node_token(req);
        let failed: std::collections::HashSet<String> =
            node.failures.iter().map(|f| f.name.clone()).collect();
        let stored = self
            .registry
            .register(node, token, &fresh, &self.policy, &log::utc_now());
        if matches!(stored, Ok(Registered::Stored { .. })) && !failed.is_empty() {
            // A failure may pause a rollout: at once, not at the next tick.
            if let Err(e) = self.releases.tick(&self.registry, Some(&failed)) {
                crate::error!("running the rollout health gate: {e}");
            }
        }
        self.registered(req, &name, stored)
    }

    /// The answer to a registration, ours or a legacy agent's.
    pub(super) fn registered(
        &self,
        req: &Request,
        name: &str,
        stored: crate::error::Result<Registered>,
    ) -> Response {
        match stored {
            Ok(Registered::Stored { node, token }) => {
                let mut data = node.to_json();
                if let (Some(token), Value::Obj(entries)) = (token, &mut data) {
                    entries.push(("nodeToken".into(), Value::Str(token)));
                }
                ok(data)
            }
            Ok(Registered::Refused(check)) => fail(403, &check.refusal(name)),
            Ok(Registered::Full) => {
                crate::error!(
                    "registry full: {} nodes (maxNodes); refused to register new node \"{name}\" from {}",
                    self.policy.max_nodes,
                    req.peer
                );
                let mut resp = fail(
                    503,
                    &format!(
                        "the registry is full ({} nodes); an admin must raise maxNodes",
                        self.policy.max_nodes
                    ),
                );
                resp.headers
                    .push(("Retry-After", FULL_RETRY_SECS.to_string()));
                resp
            }
            Ok(Registered::Unknown) => fail(404, "node not found"),
            Err(e) => super::not_stored("the registration", &e),
        }
    }

    /// A registration of a new node from `req`'s address within the rate
    /// (`registrationsPerMinute`); a 429 with `Retry-After` beyond it.
    pub(super) fn within_rate(&self, req: &Request, name: &str) -> Result<(), Response> {
        if self.registry.knows(name) {
            return Ok(());
        }
        let taken = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(client_of(req.peer), Instant::now());
        taken.map_err(|wait| {
            let secs = wait.as_secs().max(1);
            let mut resp = fail(
                429,
                &format!("too many new registrations from your address; retry in {secs} s"),
            );
            resp.headers.push(("Retry-After", secs.to_string()));
            resp
        })
    }

    /// `POST bins/NAME?node=`: the hash a node now runs.
    pub(super) fn report(&self, req: &mut Request, name: &str, q: &Query) -> Response {
        let doc = match json_body(req) {
            Ok(doc) => doc,
            Err(resp) => return resp,
        };
        if let Some(resp) = self.legacy_report(req, &doc, name, q) {
            return resp;
        }
        let hash = match doc.get("hash").and_then(Value::as_str) {
            Some(h) if crate::hash::is_md5(h) => h.to_ascii_lowercase(),
            _ => return fail(400, "body must be {\"hash\":\"<md5 hex>\"}"),
        };
        let Some(node) = &q.node else {
            return ok(Value::Null);
        }; // seed agents do not say who they are
        let token = node_token(req);
        match self
            .registry
            .report(node, name, &hash, token, &self.policy, &log::utc_now())
        {
            Ok(Reported::Stored | Reported::UnknownNode) => ok(Value::Null),
            Ok(Reported::Refused(check)) => fail(403, &check.refusal(node)),
            Err(e) => super::not_stored("the report", &e),
        }
    }

    /// `POST nodes/NAME/accept` and `POST nodes/NAME/reset` (admin).
    pub(super) fn admin_node(&self, req: &Request, name: &str, action: &str) -> Response {
        let Some(admin) = &self.admin_token else {
            return fail(403, "admin requests are disabled: configure an adminToken");
        };
        if !same_secret(bearer(req), admin) {
            return fail(401, "this needs the admin bearer token");
        }
        let (change, done): (fn(&mut Node), &str) = match action {
            "accept" => (|n| n.pending = false, "accepted: it is served from now on"),
            "reset" => (
                |n| n.token_hash.clear(),
                "token forgotten: its next registration gets a new one",
            ),
            _ => return fail(404, "not found: use nodes/NAME/accept or nodes/NAME/reset"),
        };
        match self.registry.amend(name, change) {
            Ok(Some(node)) => {
                crate::info!("node \"{name}\" {done} (by an admin from {})", req.peer);
                ok(node.to_json())
            }
            Ok(None) => fail(404, "node not found"),
            Err(e) => super::not_stored("the change", &e),
        }
    }

    /// Under manual admission, what is served (builds, their hashes and
    /// downloads) goes only to an accepted node that names itself with
    /// `?node=` and carries its token, or to an admin: `Some(refusal)`
    /// otherwise. With open admission, everyone is served.
    pub(super) fn refuse_unadmitted(&self, req: &Request, q: &Query) -> Option<Response> {
        if self.admission == Admission::Open {
            return None;
        }
        if self
            .admin_token
            .as_deref()
            .is_some_and(|a| same_secret(bearer(req), a))
        {
            return None;
        }
        let Some(node) = &q.node else {
            return Some(fail(
                403,
                "admission is manual: name this node with ?node=NAME (and its X-Node-Token)",
            ));
        };
        let refusal = match self.registry.standing(node, node_token(req)) {
            None => format!(
                "node \"{node}\" is not registered: register it (POST keepalive), then an admin accepts it"
            ),
            Some((true, _)) => format!(
                "node \"{node}\" is pending: an admin must accept it first (bin-manager node accept {node})"
            ),
            Some((false, check @ (TokenCheck::Missing | TokenCheck::Wrong))) => {
                check.refusal(node)
            }
            Some((false, TokenCheck::NoneStored | TokenCheck::Verified)) => return None,
        };
        Some(fail(403, &refusal))
    }
}

/// The request's `X-Node-Token`, if any.
pub(super) fn node_token<'r>(req: &'r Request) -> Option<&'r str> {
    req.header(identity::HEADER).filter(|t| !t.is_empty())
}
