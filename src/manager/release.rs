//! What the server serves whom. A binary's slot (`binDir/NAME`, or
//! `binDir/ARCH/NAME`) holds its newest build; the registry keeps the slot's
//! latest rollout record. This module joins the two: it notices a new
//! build (published by `PUT` or by `mv` into binDir) and records it —
//! staged when a policy applies, for the whole fleet at once otherwise —
//! answers which build a node gets while a rollout runs (remembering it, so
//! that the node's download is the build it was just told about), and runs
//! the health gate, from its own thread and after every failure report.

use super::registry::{Node, Registry};
use super::rollout::{self, BuildRef, Choice, Counts, NodeView, Policy, Refused, Rollout};
use super::rollout::{State, Transition};
use super::store::{Build, Lookup, Store};
use crate::error::{Error, Result};
use crate::hash::same;
use crate::log;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// The rollout side of the server's state.
pub struct Releases {
    /// Held while a new build is recorded, so that it gets one record even
    /// when a `PUT` and the requests that notice the new file race.
    publishing: Mutex<()>,
    /// Per slot key: the rollout id and, per node, the build its last
    /// `bins/` answer named.
    given: Mutex<HashMap<String, Given>>,
    /// The config's policy per binary name (applies to `mv` publishes too).
    policies: HashMap<String, Policy>,
}

/// One slot's remembered choices: the rollout they belong to, and per node
/// the build its last `bins/` answer named.
type Given = (String, HashMap<String, Choice>);

/// What a lookup through the releases found.
pub enum Resolved {
    /// The build to serve, and the rollout that chose it (when one runs).
    Found(Build, Option<Box<Rollout>>),
    /// Nothing published.
    Missing,
    /// Answering needs hashing or recording a new build (a worker's job).
    Unhashed,
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the rollout needs to know of a registered node.
pub fn view<'a>(node: &'a Node, r: &Rollout) -> NodeView<'a> {
    let time = |s: Option<&String>| s.and_then(|s| log::parse_rfc3339(s)).unwrap_or(0);
    NodeView {
        name: &node.name,
        labels: &node.labels,
        hash: node.hash_of(&r.name),
        since: time(node.since.get(&r.name)),
        last_seen: time(Some(&node.last_seen)),
        failed: node
            .failures
            .iter()
            .any(|f| f.name == r.name && same(&f.hash, &r.to.md5)),
    }
}

/// Whether `node` is one of the nodes `r` is about: it manages the binary
/// and would be served from `r`'s slot (an arch slot takes the nodes of
/// that arch; the plain slot the others).
fn concerns(r: &Rollout, node: &Node, arch_slots: &HashSet<String>) -> bool {
    node.binaries.iter().any(|b| b.name == r.name)
        && match &r.arch {
            Some(a) => &node.cpu_arch == a,
            None => !arch_slots.contains(&rollout::key(&r.name, Some(&node.cpu_arch))),
        }
}

impl Releases {
    /// Releases with the config's default policies.
    pub fn new(policies: HashMap<String, Policy>) -> Releases {
        Releases {
            publishing: Mutex::new(()),
            given: Mutex::new(HashMap::new()),
            policies,
        }
    }

    /// The build `node` should get for `name` (`node` is `None` for a seed
    /// agent, which gets what the fleet as a whole runs). For a download
    /// (`download`), the build the node's last `bins/` answer named.
    /// Pinned versions are served as they are: rollouts are about the
    /// newest build. `may_hash: false` (an event loop) never hashes or
    /// writes: a new build is [`Resolved::Unhashed`].
    #[allow(clippy::too_many_arguments)]
    pub fn resolve(
        &self,
        store: &Store,
        registry: &Registry,
        name: &str,
        arch: Option<&str>,
        version: Option<&str>,
        node: Option<&str>,
        download: bool,
        may_hash: bool,
    ) -> Result<Resolved> {
        let current = match store.lookup(name, arch, version, may_hash)? {
            Lookup::Found(b) => b,
            Lookup::Missing => return Ok(Resolved::Missing),
            Lookup::Unhashed => return Ok(Resolved::Unhashed),
        };
        if version.is_some() {
            return Ok(Resolved::Found(current, None));
        }
        let key = rollout::key(name, current.arch_dir.as_deref());
        let record = match registry.rollout(&key) {
            Some(r) if same(&r.to.md5, &current.md5) => r,
            _ if !may_hash => return Ok(Resolved::Unhashed),
            _ => {
                let _guard = self.lock_publishing();
                self.record(store, registry, name, &current, None)?
            }
        };
        if !record.staged || record.state == State::Done {
            return Ok(Resolved::Found(current, None));
        }
        let choice = match node {
            None if same(&record.baseline().md5, &record.to.md5) => Choice::To,
            None => Choice::From,
            Some(n) => self.choose(registry, &record, &key, n, download),
        };
        let build = match choice {
            Choice::To => current,
            Choice::From => store
                .kept(&record.from.md5, &record.from.sha256)?
                .ok_or_else(|| {
                    Error::Other(format!(
                        "{name}: the previous build {} is not kept in binDir/.builds, so the nodes outside the rollout cannot be served it",
                        log::short(&record.from.md5)
                    ))
                })?,
        };
        Ok(Resolved::Found(build, Some(Box::new(record))))
    }

    /// The choice for one node; a `bins/` answer remembers it for the
    /// node's download, which repeats it (the rollout may have moved on in
    /// between: the node still gets the bytes whose hash it was given).
    fn choose(
        &self,
        registry: &Registry,
        r: &Rollout,
        key: &str,
        node: &str,
        download: bool,
    ) -> Choice {
        let mut given = lock(&self.given);
        let slot = given.entry(key.to_string()).or_default();
        if slot.0 != r.id {
            *slot = (r.id.clone(), HashMap::new());
        }
        if download {
            if let Some(c) = slot.1.get(node) {
                return *c;
            }
        }
        let choice = match registry.node(node) {
            Some(n) => r.choose(&view(&n, r), now()),
            None => r.choose(
                &NodeView {
                    name: node,
                    labels: &[],
                    hash: "",
                    since: 0,
                    last_seen: 0,
                    failed: false,
                },
                now(),
            ),
        };
        if !download {
            slot.1.insert(node.to_string(), choice);
        }
        choice
    }

    /// Holds off other publishes while one is recorded.
    pub fn lock_publishing(&self) -> MutexGuard<'_, ()> {
        lock(&self.publishing)
    }

    /// Records `current` as the slot's new build (the caller holds
    /// [`Releases::lock_publishing`]): a staged rollout from what the fleet
    /// runs when `policy` (else the config's policy for the binary) says
    /// so and the previous build is kept; otherwise the whole fleet at once.
    pub fn record(
        &self,
        store: &Store,
        registry: &Registry,
        name: &str,
        current: &Build,
        policy: Option<Policy>,
    ) -> Result<Rollout> {
        let key = rollout::key(name, current.arch_dir.as_deref());
        let old = registry.rollout(&key);
        if let Some(r) = old.as_ref().filter(|r| same(&r.to.md5, &current.md5)) {
            return Ok(r.clone()); // recorded while this request waited for the lock
        }
        let now = now();
        let to = BuildRef {
            md5: current.md5.clone(),
            sha256: current.sha256.clone(),
            size: current.size,
        };
        let from = old.as_ref().map(|r| r.baseline().clone());
        let policy = policy.or_else(|| self.policies.get(name).cloned());
        let arch = current.arch_dir.as_deref();
        let record = match (from, policy) {
            (Some(from), Some(policy)) if !same(&from.md5, &to.md5) => {
                if store.kept(&from.md5, &from.sha256)?.is_some() {
                    Rollout::start(name, arch, from, to, policy, now)
                } else {
                    crate::error!(
                        "{name}: cannot stage the rollout of {}: the previous build {} is not kept in binDir/.builds; the new build goes to the whole fleet",
                        log::short(&to.md5),
                        log::short(&from.md5)
                    );
                    Rollout::immediate(name, arch, from, to, now)
                }
            }
            (from, _) => Rollout::immediate(name, arch, from.unwrap_or_default(), to, now),
        };
        let expected = old.as_ref().map_or(0, |r| r.revision);
        if !registry.put_rollout(&record, expected)? {
            // Another request (or replica) recorded it first.
            return registry
                .rollout(&key)
                .ok_or_else(|| Error::Other(format!("{key}: rollout record vanished")));
        }
        lock(&self.given).remove(&key);
        self.prune(store, registry);
        if record.staged {
            crate::info!(
                "{key}: new build {} published; rolling out {}→{} in steps {:?}% (soak {} s, maxFailures {}{})",
                log::short(&record.to.md5),
                log::short(&record.from.md5),
                log::short(&record.to.md5),
                record.policy.steps,
                record.policy.soak_seconds,
                record.policy.max_failures.text(),
                if record.policy.canary.is_empty() && record.policy.canary_labels.is_empty() { "" } else { ", canaries first" }
            );
        } else {
            crate::info!(
                "{key}: new build {} published to the whole fleet",
                log::short(&record.to.md5)
            );
        }
        Ok(record)
    }

    /// Drops the kept builds no rollout names.
    fn prune(&self, store: &Store, registry: &Registry) {
        let needed: HashSet<String> = registry
            .rollouts()
            .iter()
            .flat_map(|r| [r.from.md5.clone(), r.to.md5.clone()])
            .collect();
        store.prune_kept(&needed);
    }

    /// The counts of a rollout over the registry's nodes.
    pub fn count(&self, registry: &Registry, r: &Rollout, now: u64) -> Counts {
        let nodes = registry.nodes();
        let arch_slots: HashSet<String> = registry
            .rollouts()
            .iter()
            .filter(|o| o.arch.is_some() && o.name == r.name)
            .map(Rollout::key)
            .collect();
        r.count(
            nodes
                .iter()
                .filter(|n| concerns(r, n, &arch_slots))
                .map(|n| view(n, r)),
            now,
        )
    }

    /// Runs the health gate of every running rollout (of `only`, when
    /// given): pauses, opens steps and finishes. Each change is a
    /// conditional update, so two servers cannot both make it.
    pub fn tick(&self, registry: &Registry, only: Option<&HashSet<String>>) -> Result<()> {
        let now = now();
        for r in registry.rollouts() {
            if !r.staged || r.state != State::Running || only.is_some_and(|o| !o.contains(&r.name))
            {
                continue;
            }
            let counts = self.count(registry, &r, now);
            let Some(t) = r.gate(&counts, now) else {
                continue;
            };
            let mut next = r.clone();
            if next.apply(&t, counts.failed, now).is_err() {
                continue;
            }
            if registry.put_rollout(&next, r.revision)? {
                let key = r.key();
                match &t {
                    Transition::Pause(why) => crate::warn!(
                        "{key}: rollout of {} paused by the health gate: {why}",
                        log::short(&r.to.md5)
                    ),
                    Transition::Finish => crate::info!(
                        "{key}: rollout of {} done: the whole fleet gets it",
                        log::short(&r.to.md5)
                    ),
                    _ => crate::info!(
                        "{key}: rollout of {}: {} ({} of {} nodes of the last phase succeeded)",
                        log::short(&r.to.md5),
                        next.reason,
                        counts.succeeded,
                        counts.eligible
                    ),
                }
            }
        }
        Ok(())
    }

    /// An operator's pause, resume, promote or abort of the rollout at `key`.
    pub fn control(
        &self,
        registry: &Registry,
        key: &str,
        t: &Transition,
    ) -> Result<std::result::Result<Rollout, Refused>> {
        for _ in 0..3 {
            let Some(r) = registry.rollout(key).filter(|r| r.staged) else {
                return Ok(Err(Refused(format!("no staged rollout of {key}"))));
            };
            let failed = self.count(registry, &r, now()).failed;
            let mut next = r.clone();
            if let Err(refused) = next.apply(t, failed, now()) {
                return Ok(Err(refused));
            }
            if registry.put_rollout(&next, r.revision)? {
                crate::warn!(
                    "{key}: rollout of {} {} by an operator",
                    log::short(&r.to.md5),
                    next.state.word()
                );
                return Ok(Ok(next));
            }
        }
        Err(Error::Other(format!(
            "{key}: the rollout kept changing; try again"
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is a single insert or remove.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
