//! `POST /api/v1/check`: one request for an agent's whole run. The body
//! names the node, its arch and its binaries; the answer holds, for each
//! binary, exactly what `GET bins/NAME?node=NODE&arch=ARCH` would answer
//! (the rollout's decision included: both go through
//! [`App::bin_data`](super::App)), under a strong `ETag`. A request whose
//! `If-None-Match` names the current ETag is answered `304 Not Modified`
//! with no body. The heartbeat (the node's lastSeen, as `GET keepalive`)
//! is recorded in both cases, so an idle run is one request and one empty
//! answer.
//!
//! Request:
//! `{"node":"web-1","arch":"x86_64","binaries":[{"name":"app","version":"1.2"?,"hash":MD5?,"sha256":HEX?}]}`
//! (`?node=NAME` may name the node instead; the node's `X-Node-Token` as
//! for every node request). The recorded hashes are accepted and ignored:
//! the answer must not depend on them, or the ETag would change with every
//! install on every host.
//!
//! Answer: `{"code":200,"message":"Success","data":{"registered":BOOL,
//! "hasNodeToken":false?,"admission":"pending"?,"binaries":[ENTRY…]}}`
//! (the two optional keys as in the keepalive's answer: only while so) in
//! the order asked, where ENTRY is `bins/NAME`'s
//! `data` or, for a binary that cannot be answered,
//! `{"name":N,"code":404,"message":"binary not found"}` (the status
//! `bins/NAME` would have answered). `registered` is false when the node is
//! not in the registry, `hasNodeToken` false when the registry holds no
//! token for it (an admin reset it): the agent registers (`POST keepalive`)
//! and asks again.

use super::nodes::node_token;
use super::{fail, json_body, ok, App, Query};
use crate::json::Value;
use crate::log;
use crate::manager::http::{Payload, Request, Response};
use crate::manager::store::valid_name;

/// Most binaries one check may name.
const MAX_BINARIES: usize = 1000;

impl App {
    pub(super) fn check(&self, req: &mut Request, q: &Query) -> Response {
        let doc = match json_body(req) {
            Ok(doc) => doc,
            Err(resp) => return resp,
        };
        let node = match (&q.node, doc.get("node").and_then(Value::as_str)) {
            (Some(n), _) => n.clone(),
            (None, Some(n)) if valid_name(n) => n.to_string(),
            (None, Some(_)) => return fail(400, "invalid node name"),
            (None, None) => return fail(400, "missing \"node\" (or ?node=NAME)"),
        };
        let arch = match doc.get("arch").map(Value::as_str) {
            None | Some(Some("")) => None,
            Some(Some(a)) if valid_name(a) => Some(a.to_string()),
            Some(_) => return fail(400, "invalid arch: use letters, digits, '.', '_' and '-'"),
        };
        let Some(Value::Arr(asked)) = doc.get("binaries") else {
            return fail(400, "missing \"binaries\": a list of {\"name\": NAME}");
        };
        if asked.len() > MAX_BINARIES {
            return fail(
                400,
                &format!("more than {MAX_BINARIES} binaries in one check"),
            );
        }
        let mut bq = Query {
            node: Some(node.clone()),
            arch,
            version: None,
            pairs: Vec::new(),
            action: None,
        };
        if let Some(refusal) = self.refuse_unadmitted(req, &bq) {
            return refusal;
        }
        let found =
            match self
                .registry
                .heartbeat(&node, node_token(req), &self.policy, &log::utc_now())
            {
                Ok(found) => found,
                Err(check) => return fail(403, &check.refusal(&node)),
            };
        let mut entries = Vec::with_capacity(asked.len());
        for item in asked {
            let name = item.get("name").and_then(Value::as_str).unwrap_or("");
            let version = item.get("version").and_then(Value::as_str);
            entries.push(if !valid_name(name) {
                entry_error(
                    name,
                    400,
                    "invalid name: use letters, digits, '.', '_' and '-'",
                )
            } else if version.is_some_and(|v| !v.is_empty() && v != "latest" && !valid_name(v)) {
                entry_error(name, 400, "invalid version")
            } else {
                bq.version = version
                    .filter(|v| !v.is_empty() && *v != "latest")
                    .map(str::to_string);
                match self.bin_data(name, &bq, true) {
                    Ok(Some((data, _))) => data,
                    Ok(None) => entry_error(name, 500, "no answer for this binary"),
                    Err(resp) => entry_error(name, resp.status, &message_of(&resp)),
                }
            });
        }
        let mut data = vec![("registered", Value::Bool(found.is_some()))];
        // As the keepalive says it: only while true, so the ETag stays put.
        if found.as_ref().is_some_and(|n| n.token_hash.is_empty()) {
            data.push(("hasNodeToken", Value::Bool(false)));
        }
        if found.as_ref().is_some_and(|n| n.pending) {
            data.push(("admission", Value::str("pending")));
        }
        data.push(("binaries", Value::Arr(entries)));
        let data = Value::obj(data);
        let etag = etag_of(&data.to_compact());
        if req
            .header("if-none-match")
            .is_some_and(|h| matches_etag(h, &etag))
        {
            return Response {
                status: 304,
                headers: vec![("ETag", etag)],
                body: Payload::Bytes(Vec::new()),
            };
        }
        let mut resp = ok(data);
        resp.headers.push(("ETag", etag));
        resp
    }
}

fn entry_error(name: &str, code: u16, message: &str) -> Value {
    Value::obj([
        ("name", Value::str(name)),
        ("code", Value::int(code)),
        ("message", Value::str(message)),
    ])
}

/// The `message` of an error envelope.
fn message_of(resp: &Response) -> String {
    let Payload::Bytes(body) = &resp.body else {
        return String::new();
    };
    std::str::from_utf8(body)
        .ok()
        .and_then(|t| crate::json::parse(t).ok())
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

/// A strong ETag over the answer's `data`: 128 bits of its sha256.
fn etag_of(data: &str) -> String {
    let mut sha = crate::hash::Sha256::new();
    sha.update(data.as_bytes());
    format!("\"{}\"", &sha.hex()[..32])
}

/// `If-None-Match` (a list, or `*`) against our ETag; a `W/` prefix is
/// compared weakly, as RFC 9110 wants for this header.
fn matches_etag(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match() {
        let e = etag_of("{}");
        assert_eq!(e.len(), 34);
        assert!(matches_etag(&e, &e));
        assert!(matches_etag(&format!("\"x\", W/{e}"), &e));
        assert!(matches_etag("*", &e));
        assert!(!matches_etag("\"x\"", &e));
        assert_ne!(etag_of("{}"), etag_of("{ }"));
    }
}
