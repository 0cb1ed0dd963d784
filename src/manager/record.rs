//! What the server knows about one node, and its JSON forms: the view the
//! protocol shows (the keepalive `data`; never the token hash) and the form
//! the registry stores (with the token hash, admission, and what it keeps
//! per binary). A registration body is read with the first, so no agent can
//! set its own token hash, admit itself or write the server's bookkeeping.

use super::legacy::LegacyBin;
use crate::json::Value;
use crate::protocol::{BinaryFact, FailureFact};
use std::collections::BTreeMap;

/// What the server knows about one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// `uname -m`.
    pub cpu_arch: String,
    /// OS pretty name.
    pub os_release: String,
    /// The agent's version.
    pub proxy_version: String,
    /// What it runs, per its last registration and reports.
    pub binaries: Vec<BinaryFact>,
    /// Failures it reported (latest per binary).
    pub failures: Vec<FailureFact>,
    /// Last contact, RFC 3339 UTC.
    pub last_seen: String,
    /// First registration, RFC 3339 UTC.
    pub registered: String,
    /// Labels it registered with (`node.labels` in its manifest), sorted.
    pub labels: Vec<(String, String)>,
    /// Per binary, since when it runs the hash it last said (RFC 3339 UTC).
    pub since: BTreeMap<String, String>,
    /// Per binary, what an agent of the original project said (its sha256,
    /// its progress); empty for bin-proxy nodes. See `legacy.rs`.
    pub legacy: BTreeMap<String, LegacyBin>,
    /// sha256 of the node's token; empty when it has none.
    pub token_hash: String,
    /// Waiting for an admin to accept it (manual admission).
    pub pending: bool,
}

impl Node {
    /// The node as the protocol shows it (the keepalive `data`): no token
    /// hash; `"admission":"pending"` only while it is pending, and
    /// `"hasNodeToken":false` only while it has no token (so that its agent
    /// registers to get one).
    pub fn to_json(&self) -> Value {
        let mut v = self.fields();
        if self.pending {
            v.push(("admission".into(), Value::str("pending")));
        }
        if self.token_hash.is_empty() {
            v.push(("hasNodeToken".into(), Value::Bool(false)));
        }
        Value::Obj(v)
    }

    /// The node as the registry stores it: with its token hash and admission.
    pub(super) fn to_stored(&self) -> Value {
        let mut v = self.fields();
        v.push(("tokenHash".into(), Value::str(&self.token_hash)));
        v.push(("pending".into(), Value::Bool(self.pending)));
        Value::Obj(v)
    }

    fn fields(&self) -> Vec<(String, Value)> {
        let bins = self.binaries.iter().map(BinaryFact::to_json);
        let failures = self.failures.iter().map(FailureFact::to_json);
        let pairs = |m: &mut dyn Iterator<Item = (&String, &String)>| {
            Value::Obj(m.map(|(k, v)| (k.clone(), Value::str(v))).collect())
        };
        let mut v: Vec<(String, Value)> = vec![
            ("name".into(), Value::str(&self.name)),
            ("cpuArch".into(), Value::str(&self.cpu_arch)),
            ("osRelease".into(), Value::str(&self.os_release)),
            ("proxyVersion".into(), Value::str(&self.proxy_version)),
            ("binaries".into(), Value::Arr(bins.collect())),
            ("failures".into(), Value::Arr(failures.collect())),
            ("lastSeen".into(), Value::str(&self.last_seen)),
            ("registered".into(), Value::str(&self.registered)),
            (
                "labels".into(),
                pairs(&mut self.labels.iter().map(|(k, v)| (k, v))),
            ),
            ("since".into(), pairs(&mut self.since.iter())),
        ];
        if !self.legacy.is_empty() {
            let legacy = self.legacy.iter().map(|(k, l)| (k.clone(), l.to_json()));
            v.push(("legacy".into(), Value::Obj(legacy.collect())));
        }
        v
    }

    /// The hash it last said it runs for `bin` ("" when none).
    pub fn hash_of(&self, bin: &str) -> &str {
        self.binaries
            .iter()
            .find(|b| b.name == bin)
            .map_or("", |b| b.hash.as_str())
    }

    /// Reads a stored node: with what the server keeps per binary, its
    /// token hash and admission.
    pub(super) fn from_stored(v: &Value) -> std::result::Result<Node, String> {
        let mut node = Node::from_json(v)?;
        node.since = strings(v, "since")?.into_iter().collect();
        node.legacy = match v.get("legacy") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Obj(pairs)) => pairs
                .iter()
                .map(|(k, l)| Ok((k.clone(), LegacyBin::from_json(l)?)))
                .collect::<std::result::Result<_, String>>()?,
            Some(o) => return Err(format!("\"legacy\" must be an object, not {}", o.kind())),
        };
        node.token_hash = v
            .get("tokenHash")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        node.pending = matches!(v.get("pending"), Some(Value::Bool(true)));
        Ok(node)
    }

    /// Reads a registration body (or the common part of a stored node).
    /// Strings may be missing; present ones must have the right type (as
    /// the original server's typed binding demands).
    pub fn from_json(v: &Value) -> std::result::Result<Node, String> {
        if !matches!(v, Value::Obj(_)) {
            return Err(format!("the body must be a JSON object, not {}", v.kind()));
        }
        let s = |obj: &Value, k: &str| -> std::result::Result<String, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::Str(s)) => Ok(s.clone()),
                Some(o) => Err(format!("\"{k}\" must be a string, not {}", o.kind())),
            }
        };
        let list = |k: &str| -> std::result::Result<Vec<Value>, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Arr(items)) => Ok(items.clone()),
                Some(o) => Err(format!("\"{k}\" must be a list, not {}", o.kind())),
            }
        };
        let mut binaries = Vec::new();
        for (i, b) in list("binaries")?.iter().enumerate() {
            if !matches!(b, Value::Obj(_)) {
                return Err(format!(
                    "\"binaries\"[{i}] must be an object, not {}",
                    b.kind()
                ));
            }
            binaries.push(BinaryFact {
                name: s(b, "name")?,
                version: s(b, "version")?,
                hash: s(b, "hash")?.to_ascii_lowercase(),
            });
        }
        let mut failures = Vec::new();
        for f in list("failures")? {
            failures.push(FailureFact {
                name: s(&f, "name")?,
                hash: s(&f, "hash")?,
                error: s(&f, "error")?,
                at: s(&f, "at")?,
            });
        }
        let mut labels = strings(v, "labels")?;
        labels.sort();
        labels.dedup_by(|a, b| a.0 == b.0);
        Ok(Node {
            labels,
            name: s(v, "name")?,
            cpu_arch: s(v, "cpuArch")?,
            os_release: s(v, "osRelease")?,
            proxy_version: s(v, "proxyVersion")?,
            binaries,
            failures,
            last_seen: s(v, "lastSeen")?,
            registered: s(v, "registered")?,
            ..Node::default()
        })
    }
}

/// A JSON object of strings as (key, value) pairs.
fn strings(v: &Value, k: &str) -> std::result::Result<Vec<(String, String)>, String> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Obj(pairs)) => pairs
            .iter()
            .map(|(name, val)| match val {
                Value::Str(s) => Ok((name.clone(), s.clone())),
                o => Err(format!(
                    "\"{k}\".\"{name}\" must be a string, not {}",
                    o.kind()
                )),
            })
            .collect(),
        Some(o) => Err(format!("\"{k}\" must be an object, not {}", o.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;

    #[test]
    fn registration_types_are_checked() {
        let bad = json::parse(r#"{"name":"n","binaries":"x"}"#).unwrap();
        assert_eq!(
            Node::from_json(&bad).unwrap_err(),
            "\"binaries\" must be a list, not a string"
        );
        let bad = json::parse(r#"{"name":"n","binaries":[{"name":1}]}"#).unwrap();
        assert_eq!(
            Node::from_json(&bad).unwrap_err(),
            "\"name\" must be a string, not a number"
        );
        let bad = json::parse(r#"{"name":"n","binaries":["a"]}"#).unwrap();
        assert_eq!(
            Node::from_json(&bad).unwrap_err(),
            "\"binaries\"[0] must be an object, not a string"
        );
    }

    #[test]
    fn a_registration_body_cannot_set_its_token_or_admit_itself() {
        let body = json::parse(r#"{"name":"n","tokenHash":"abc","pending":false}"#).unwrap();
        assert_eq!(Node::from_json(&body).unwrap().token_hash, "");
        let stored = Node {
            name: "n".into(),
            token_hash: "abc".into(),
            pending: true,
            ..Node::default()
        };
        let back = Node::from_stored(&stored.to_stored()).unwrap();
        assert_eq!(back, stored);
        let shown = stored.to_json().to_compact();
        assert!(
            !shown.contains("abc") && shown.contains("\"admission\":\"pending\""),
            "{shown}"
        );
    }
}
