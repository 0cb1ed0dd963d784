//! The registry's writes about nodes, each judged under the same lock as
//! the write: heartbeats, registrations, reports, the original project's
//! agents' updates, and an admin's changes — with the node's token checked
//! ([`identity`]), `maxNodes` kept, and new nodes pending under manual
//! admission.

use super::{apply, Node, Registry};
use crate::error::Result;
use crate::json::Value;
use crate::manager::identity::{self, TokenCheck};
use std::sync::Arc;

/// The policy a registration is judged by (from the config).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Refuse writes for a known node without its token.
    pub require_tokens: bool,
    /// A new node starts `pending`.
    pub manual_admission: bool,
    /// Most nodes.
    pub max_nodes: usize,
}

/// What became of a registration.
#[derive(Debug)]
pub enum Registered {
    /// Stored; `token` is set when the node was given a new token (its
    /// first registration, or the first after its token was reset).
    Stored {
        /// The record as stored.
        node: Box<Node>,
        /// The new token, to be sent once and never again.
        token: Option<String>,
    },
    /// Refused, nothing changed: the token was wrong or missing.
    Refused(TokenCheck),
    /// Refused, nothing changed: a new node, and the registry is full.
    Full,
    /// Nothing changed: no such node, and none was to be made.
    Unknown,
}

/// What became of a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Reported {
    /// Stored.
    Stored,
    /// Ignored: no such node (a seed agent does not name itself).
    UnknownNode,
    /// Refused, nothing changed.
    Refused(TokenCheck),
}

impl Registry {
    /// A heartbeat: the node's record with lastSeen now, `Ok(None)` if
    /// unknown, `Err` (nothing changed) when its token check refuses it.
    /// Only memory changes; [`Registry::flush_seen`] persists in batches.
    pub fn heartbeat(
        &self,
        name: &str,
        token: Option<&str>,
        policy: &Policy,
        now: &str,
    ) -> std::result::Result<Option<Node>, TokenCheck> {
        let mut inner = self.lock();
        let Some(node) = inner.fleet.nodes.get_mut(name) else {
            return Ok(None);
        };
        let check = identity::check(&node.token_hash, token);
        if check.refuses(policy.require_tokens) {
            return Err(check);
        }
        let node = Arc::make_mut(node);
        node.last_seen = now.to_string();
        let node = node.clone();
        inner.seen.insert(name.to_string());
        Ok(Some(node))
    }

    /// Whether `name` is known.
    pub fn knows(&self, name: &str) -> bool {
        self.lock().fleet.nodes.contains_key(name)
    }

    /// A known node's admission and how `token` compares with its own.
    pub fn standing(&self, name: &str, token: Option<&str>) -> Option<(bool, TokenCheck)> {
        let inner = self.lock();
        let node = inner.fleet.nodes.get(name)?;
        Some((node.pending, identity::check(&node.token_hash, token)))
    }

    /// Stores a registration durably, judged under the lock: a known node
    /// needs its token (see [`TokenCheck::refuses`]) and keeps its token,
    /// admission, first-registration time and how long it has run each
    /// hash; a new node needs room, starts pending under manual admission,
    /// and gets `fresh` as its token (as does a known node that has none).
    pub fn register(
        &self,
        mut node: Node,
        token: Option<&str>,
        fresh: &str,
        policy: &Policy,
        now: &str,
    ) -> Result<Registered> {
        node.last_seen = now.to_string();
        let name = node.name.clone();
        let mut verdict = None;
        let mut issued = None;
        self.commit_if(
            |inner| {
                let old = inner.fleet.nodes.get(&name);
                match old {
                    None if inner.fleet.nodes.len() >= policy.max_nodes => {
                        verdict = Some(Registered::Full);
                        return None;
                    }
                    None => {
                        node.registered = now.to_string();
                        node.pending = policy.manual_admission;
                    }
                    Some(old) => {
                        let check = identity::check(&old.token_hash, token);
                        if check.refuses(policy.require_tokens) {
                            verdict = Some(Registered::Refused(check));
                            return None;
                        }
                        node.registered = Some(old.registered.clone())
                            .filter(|r| !r.is_empty())
                            .unwrap_or_else(|| now.to_string());
                        node.token_hash = old.token_hash.clone();
                        node.pending = old.pending;
                    }
                }
                node.since = node
                    .binaries
                    .iter()
                    .map(|b| {
                        let kept = old
                            .filter(|o| o.hash_of(&b.name).eq_ignore_ascii_case(&b.hash))
                            .and_then(|o| o.since.get(&b.name).cloned());
                        (b.name.clone(), kept.unwrap_or_else(|| now.to_string()))
                    })
                    .collect();
                if node.token_hash.is_empty() {
                    node.token_hash = identity::token_hash(fresh);
                    issued = Some(fresh.to_string());
                }
                Some(Value::obj([
                    ("op", Value::str("node")),
                    ("node", node.to_stored()),
                ]))
            },
            |inner, op| {
                apply(&mut inner.fleet, op);
                inner.seen.remove(&name);
            },
        )?;
        if let Some(v) = verdict {
            return Ok(v);
        }
        let stored = self.node(&name).map(|n| Node::clone(&n));
        Ok(Registered::Stored {
            node: Box::new(stored.unwrap_or(node)),
            token: issued,
        })
    }

    /// Stores "node runs hash of bin" durably. Unknown nodes are ignored
    /// (a seed agent reports without naming itself); a known one's token
    /// is checked as for a registration.
    pub fn report(
        &self,
        node: &str,
        bin: &str,
        hash: &str,
        token: Option<&str>,
        policy: &Policy,
        now: &str,
    ) -> Result<Reported> {
        let op = Value::obj([
            ("op", Value::str("report")),
            ("node", Value::str(node)),
            ("bin", Value::str(bin)),
            ("hash", Value::str(hash)),
            ("at", Value::str(now)),
        ]);
        let mut verdict = Reported::Stored;
        self.commit_if(
            |inner| {
                let Some(known) = inner.fleet.nodes.get(node) else {
                    verdict = Reported::UnknownNode;
                    return None;
                };
                let check = identity::check(&known.token_hash, token);
                if check.refuses(policy.require_tokens) {
                    verdict = Reported::Refused(check);
                    return None;
                }
                Some(op.clone())
            },
            |inner, op| apply(&mut inner.fleet, op),
        )?;
        Ok(verdict)
    }

    /// Changes one node's record under the lock: `change` gets the stored
    /// record (a new one named `name` when the node is unknown and `create`,
    /// within `maxNodes` and pending under manual admission). A known
    /// node's token is checked as for a registration. A change is stored
    /// durably like a registration; no change only refreshes lastSeen,
    /// batched like a heartbeat. `change` must not call the registry.
    pub fn update_node(
        &self,
        name: &str,
        now: &str,
        create: bool,
        token: Option<&str>,
        policy: &Policy,
        change: impl FnOnce(&mut Node),
    ) -> Result<Registered> {
        let mut verdict = Registered::Unknown;
        self.commit_if(
            |inner| {
                let before = match inner.fleet.nodes.get(name) {
                    Some(n) => {
                        let check = identity::check(&n.token_hash, token);
                        if check.refuses(policy.require_tokens) {
                            verdict = Registered::Refused(check);
                            return None;
                        }
                        Some(n.clone())
                    }
                    None if !create => return None,
                    None if inner.fleet.nodes.len() >= policy.max_nodes => {
                        verdict = Registered::Full;
                        return None;
                    }
                    None => None,
                };
                let mut node = before.as_deref().cloned().unwrap_or_else(|| Node {
                    name: name.to_string(),
                    registered: now.to_string(),
                    pending: policy.manual_admission,
                    ..Node::default()
                });
                change(&mut node);
                let unchanged = before.as_deref() == Some(&node);
                node.last_seen = now.to_string();
                verdict = Registered::Stored {
                    node: Box::new(node.clone()),
                    token: None,
                };
                if unchanged {
                    inner.fleet.nodes.insert(name.to_string(), Arc::new(node));
                    inner.seen.insert(name.to_string());
                    return None;
                }
                Some(Value::obj([
                    ("op", Value::str("node")),
                    ("node", node.to_stored()),
                ]))
            },
            |inner, op| {
                apply(&mut inner.fleet, op);
                inner.seen.remove(name);
            },
        )?;
        Ok(verdict)
    }

    /// An admin's change to a known node (accepting it, forgetting its
    /// token), stored durably; `None` when there is no such node.
    pub fn amend(&self, name: &str, change: impl FnOnce(&mut Node)) -> Result<Option<Node>> {
        let mut found = false;
        self.commit_if(
            |inner| {
                let mut node = Node::clone(inner.fleet.nodes.get(name)?);
                found = true;
                change(&mut node);
                Some(Value::obj([
                    ("op", Value::str("node")),
                    ("node", node.to_stored()),
                ]))
            },
            |inner, op| apply(&mut inner.fleet, op),
        )?;
        Ok(found
            .then(|| self.node(name).map(|n| Node::clone(&n)))
            .flatten())
    }
}
