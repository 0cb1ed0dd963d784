//! The fleet registry: every node's registration, the hashes it reported,
//! its failures and when it was last seen. Durable without rewriting the
//! world per request: each registration or report is one JSON line appended
//! to `stateFile.log` and fsynced (outside the lock, so concurrent commits
//! share flushes) before its 200 is sent; `lastSeen` (which changes every
//! minute for every node) is kept in memory and appended in one batched
//! line every few seconds; when the log grows past a limit it is set aside
//! and folded into the snapshot `stateFile` (streamed, fsync, rename) while
//! requests go on. Every line sets values, so replaying one again is
//! harmless and a crash at any step loses nothing. The files are mode 0600:
//! they hold the hashes of the nodes' tokens.
//!
//! Each node may hold the hash of its token ([`super::identity`]) and a
//! `pending` mark (manual admission). Both are decided here, under the same
//! lock as the write they guard, so two hosts registering one new name at
//! once cannot both be given its token.

use super::identity::{self, TokenCheck};
pub use super::record::Node;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::json::{self, Value};
use crate::protocol::BinaryFact;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The log is folded into the snapshot when it grows past this.
const COMPACT_AT: u64 = 8 << 20;

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

struct Inner {
    /// Nodes by name; an `Arc` each so that a snapshot is a cheap map clone.
    nodes: BTreeMap<String, Arc<Node>>,
    /// Nodes whose lastSeen changed since the last batch was written.
    seen: BTreeSet<String>,
    log: Arc<File>,
    log_len: u64,
    /// A fold is running (at most one at a time).
    folding: bool,
}

/// The registry's files.
struct Files {
    snapshot: PathBuf,
    log: PathBuf,
    /// Where the log goes while a fold writes the snapshot.
    folded: PathBuf,
}

/// The registry and its files.
pub struct Registry {
    files: Arc<Files>,
    inner: Arc<Mutex<Inner>>,
    /// Log size at which the log is folded into the snapshot.
    compact_at: u64,
}

impl Registry {
    /// Loads `state_file` and replays its logs (a torn last line is ignored).
    pub fn open(state_file: &Path) -> Result<Registry> {
        let dir = fsutil::parent(state_file);
        fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let with_suffix = |suffix: &str| {
            let mut p = state_file.as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        };
        let (log_path, folded_path) = (with_suffix(".log"), with_suffix(".log.folding"));
        let mut nodes = BTreeMap::new();
        match fs::read_to_string(state_file) {
            Ok(text) => {
                let doc = json::parse(&text).map_err(|e| Error::Config {
                    path: state_file.to_path_buf(),
                    msg: format!("damaged state file: invalid JSON at {e}"),
                })?;
                if let Some(Value::Arr(items)) = doc.get("nodes") {
                    for item in items {
                        let node = Node::from_stored(item).map_err(|msg| Error::Config {
                            path: state_file.to_path_buf(),
                            msg,
                        })?;
                        nodes.insert(node.name.clone(), Arc::new(node));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("reading", state_file, e)),
        }
        // A fold interrupted by a crash leaves its log beside the newer one;
        // replaying both, oldest first, is exact (every line sets values).
        for path in [&folded_path, &log_path] {
            let Ok(text) = fs::read_to_string(path) else {
                continue;
            };
            let lines: Vec<&str> = text.split('\n').filter(|l| !l.trim().is_empty()).collect();
            for (i, line) in lines.iter().enumerate() {
                match json::parse(line) {
                    Ok(op) => apply(&mut nodes, &op),
                    Err(_) if i + 1 == lines.len() => {
                        crate::warn!("ignoring a torn last line in \"{}\"", path.display())
                    }
                    Err(e) => crate::warn!(
                        "ignoring a damaged line {} in \"{}\": {e}",
                        i + 1,
                        path.display()
                    ),
                }
            }
        }
        let log = open_log(&log_path)?;
        let log_len = log.metadata().map(|m| m.len()).unwrap_or(0);
        let registry = Registry {
            files: Arc::new(Files {
                snapshot: state_file.to_path_buf(),
                log: log_path,
                folded: folded_path,
            }),
            compact_at: COMPACT_AT,
            inner: Arc::new(Mutex::new(Inner {
                nodes,
                seen: BTreeSet::new(),
                log: Arc::new(log),
                log_len,
                folding: false,
            })),
        };
        // Start from a compact state: fold whatever the logs held.
        registry.lock().folding = true;
        fold(&registry.files, &registry.inner)?;
        Ok(registry)
    }

    /// How many nodes are known.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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
        let Some(node) = inner.nodes.get_mut(name) else {
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
        self.lock().nodes.contains_key(name)
    }

    /// A known node's admission and how `token` compares with its own.
    pub fn standing(&self, name: &str, token: Option<&str>) -> Option<(bool, TokenCheck)> {
        let inner = self.lock();
        let node = inner.nodes.get(name)?;
        Some((node.pending, identity::check(&node.token_hash, token)))
    }

    /// Stores a registration durably, judged under the lock: a known node
    /// needs its token (see [`TokenCheck::refuses`]) and keeps its token,
    /// admission and first-registration time; a new node needs room, starts
    /// pending under manual admission, and gets `fresh` as its token (as
    /// does a known node that has none).
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
                match inner.nodes.get(&name) {
                    None if inner.nodes.len() >= policy.max_nodes => {
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
                apply(&mut inner.nodes, op);
                inner.seen.remove(&name);
            },
        )?;
        if let Some(v) = verdict {
            return Ok(v);
        }
        let stored = self.lock().nodes.get(&name).map(|n| Node::clone(n));
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
                let Some(known) = inner.nodes.get(node) else {
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
            |inner, op| apply(&mut inner.nodes, op),
        )?;
        Ok(verdict)
    }

    /// An admin's change to a known node (accepting it, forgetting its
    /// token), stored durably; `None` when there is no such node.
    pub fn amend(&self, name: &str, change: impl FnOnce(&mut Node)) -> Result<Option<Node>> {
        let mut found = false;
        self.commit_if(
            |inner| {
                let mut node = Node::clone(inner.nodes.get(name)?);
                found = true;
                change(&mut node);
                Some(Value::obj([
                    ("op", Value::str("node")),
                    ("node", node.to_stored()),
                ]))
            },
            |inner, op| apply(&mut inner.nodes, op),
        )?;
        Ok(found
            .then(|| self.lock().nodes.get(name).map(|n| Node::clone(n)))
            .flatten())
    }

    /// Writes the batched lastSeen changes (one line, one fsync).
    pub fn flush_seen(&self) -> Result<()> {
        if self.lock().seen.is_empty() {
            return Ok(());
        }
        self.commit(
            |inner| {
                let seen = std::mem::take(&mut inner.seen);
                let entries: Vec<(String, Value)> = seen
                    .iter()
                    .filter_map(|n| {
                        inner
                            .nodes
                            .get(n)
                            .map(|node| (n.clone(), Value::str(&node.last_seen)))
                    })
                    .collect();
                Value::obj([("op", Value::str("seen")), ("nodes", Value::Obj(entries))])
            },
            |_, _| {},
        )
    }

    /// A copy of every node, by name.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock().nodes.values().cloned().collect()
    }

    /// Appends one log line and applies it, under the lock; then makes it
    /// durable outside the lock, so that concurrent commits share flushes
    /// instead of queueing behind each other's. Returns once this line is
    /// on disk. Folds the log into the snapshot when it grew too long.
    fn commit(
        &self,
        make: impl FnOnce(&mut Inner) -> Value,
        then: impl FnOnce(&mut Inner, &Value),
    ) -> Result<()> {
        self.commit_if(|inner| Some(make(inner)), then)
    }

    /// [`Registry::commit`] for a change decided under the lock: `make`
    /// returning `None` writes nothing.
    fn commit_if(
        &self,
        make: impl FnOnce(&mut Inner) -> Option<Value>,
        then: impl FnOnce(&mut Inner, &Value),
    ) -> Result<()> {
        let (log, fold) = {
            let mut inner = self.lock();
            let Some(op) = make(&mut inner) else {
                return Ok(());
            };
            let mut line = op.to_compact();
            line.push('\n');
            (&*inner.log)
                .write_all(line.as_bytes())
                .map_err(|e| Error::io("appending to", &self.files.log, e))?;
            inner.log_len += line.len() as u64;
            then(&mut inner, &op);
            let fold = inner.log_len > self.compact_at && !inner.folding;
            inner.folding |= fold;
            (inner.log.clone(), fold)
        };
        log.sync_data()
            .map_err(|e| Error::io("syncing", &self.files.log, e))?;
        if fold {
            self.fold_in_background();
        }
        Ok(())
    }

    /// Folds the log into the snapshot on a thread of its own: the request
    /// whose line made the log too long does not wait for a snapshot of the
    /// whole fleet. A fold that fails is logged, and the next commit tries
    /// again.
    fn fold_in_background(&self) {
        let (files, inner) = (self.files.clone(), self.inner.clone());
        let spawned = std::thread::Builder::new()
            .name("registry-fold".into())
            .spawn(move || {
                if let Err(e) = fold(&files, &inner) {
                    crate::error!(
                        "folding the registry log into \"{}\": {e}; the next change tries again",
                        files.snapshot.display()
                    );
                }
            });
        if let Err(e) = spawned {
            crate::error!(
                "cannot start folding the registry log: {e}; the next change tries again"
            );
            self.lock().folding = false;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Every mutation is applied after its log line is written; a panic in
    // between leaves memory behind the disk, never ahead: keep serving.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// Folds the log into the snapshot. Under the lock only the log is switched
/// (set aside, a new one opened) and the node map cloned (cheap: `Arc`s);
/// the snapshot is then streamed to disk while requests go on, and the
/// set-aside log is removed. Ends with `folding` cleared, whatever happened.
fn fold(files: &Files, inner: &Mutex<Inner>) -> Result<()> {
    let result = (|| {
        let nodes = {
            let mut inner = lock(inner);
            set_log_aside(files)?;
            inner.log = Arc::new(open_log(&files.log)?);
            inner.log_len = 0;
            inner.nodes.clone()
        };
        fsutil::atomic_write_with(&files.snapshot, fsutil::Mode::Force(0o600), &mut |w| {
            w.write_all(b"{\"nodes\":[\n")?;
            for (i, node) in nodes.values().enumerate() {
                if i > 0 {
                    w.write_all(b",\n")?;
                }
                w.write_all(node.to_stored().to_compact().as_bytes())?;
            }
            w.write_all(b"\n]}\n")
        })?;
        match fs::remove_file(&files.folded) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io("removing", &files.folded, e));
            }
            _ => {}
        }
        fsutil::sync_dir(fsutil::parent(&files.snapshot))
    })();
    lock(inner).folding = false;
    result
}

/// Moves the log's lines to the set-aside file. Normally a rename; but when
/// an earlier fold failed or was cut short by a crash, the set-aside file
/// still holds lines the snapshot on disk lacks, so the log is appended to
/// it (after a newline, should its last line be torn) instead of replacing it.
fn set_log_aside(files: &Files) -> Result<()> {
    let aside = match fs::metadata(&files.folded) {
        Ok(_) => OpenOptions::new()
            .read(true)
            .append(true)
            .open(&files.folded),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match fs::rename(&files.log, &files.folded) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("setting aside", &files.log, e))
                }
                _ => Ok(()),
            };
        }
        Err(e) => Err(e),
    };
    let mut aside = aside.map_err(|e| Error::io("opening", &files.folded, e))?;
    let io = |e| Error::io("appending the log to", &files.folded, e);
    let mut current = match File::open(&files.log) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("reading", &files.log, e)),
    };
    let len = aside.metadata().map_err(io)?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&aside, &mut last, len - 1).map_err(io)?;
        if last != *b"\n" {
            aside.write_all(b"\n").map_err(io)?;
        }
    }
    std::io::copy(&mut current, &mut aside).map_err(io)?;
    aside.sync_data().map_err(io)?;
    fs::remove_file(&files.log).map_err(|e| Error::io("removing", &files.log, e))
}

/// Opens (creating) a registry log, mode 0600 — also one an older version
/// created readable by everyone.
fn open_log(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("opening", path, e))?;
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("setting the mode of", path, e))?;
    Ok(file)
}

/// Applies one log line to the node map. Idempotent.
fn apply(nodes: &mut BTreeMap<String, Arc<Node>>, op: &Value) {
    let s = |k: &str| op.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match op.get("op").and_then(Value::as_str) {
        Some("node") => {
            if let Some(node) = op.get("node").and_then(|n| Node::from_stored(n).ok()) {
                nodes.insert(node.name.clone(), Arc::new(node));
            }
        }
        Some("report") => {
            if let Some(node) = nodes.get_mut(&s("node")).map(Arc::make_mut) {
                let (bin, hash) = (s("bin"), s("hash"));
                match node.binaries.iter_mut().find(|b| b.name == bin) {
                    Some(b) => b.hash = hash,
                    None => node.binaries.push(BinaryFact {
                        name: bin,
                        version: "latest".into(),
                        hash,
                    }),
                }
                node.last_seen = s("at");
            }
        }
        Some("seen") => {
            if let Some(Value::Obj(entries)) = op.get("nodes") {
                for (name, at) in entries {
                    if let (Some(node), Some(at)) =
                        (nodes.get_mut(name).map(Arc::make_mut), at.as_str())
                    {
                        node.last_seen = at.to_string();
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Policy = Policy {
        require_tokens: false,
        manual_admission: false,
        max_nodes: 100,
    };

    fn register(reg: &Registry, node: Node, now: &str) -> Registered {
        reg.register(node, None, "fresh-token", &OPEN, now).unwrap()
    }

    #[test]
    fn survives_reopen_with_log_and_snapshot() {
        let dir = std::env::temp_dir().join(format!("bin-manager-registry-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = dir.join("state.json");
        let reg = Registry::open(&state).unwrap();
        let node = Node {
            name: "n1".into(),
            cpu_arch: "x86_64".into(),
            ..Node::default()
        };
        register(&reg, node, "2026-01-01T00:00:00Z");
        let token = Some("fresh-token");
        assert_eq!(
            reg.report("n1", "app", "ab", token, &OPEN, "2026-01-01T00:00:01Z")
                .unwrap(),
            Reported::Stored
        );
        assert_eq!(
            reg.report("nobody", "app", "ab", None, &OPEN, "t").unwrap(),
            Reported::UnknownNode
        );
        assert!(reg
            .heartbeat("n1", token, &OPEN, "2026-01-01T00:00:09Z")
            .unwrap()
            .is_some());
        reg.flush_seen().unwrap();
        assert!(reg.heartbeat("nobody", None, &OPEN, "t").unwrap().is_none());
        drop(reg);

        // A torn line at the end (a crash mid-append) is ignored.
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.join("state.json.log"))
            .unwrap();
        log.write_all(b"{\"op\":\"report\",\"node\":\"n1\",\"bi")
            .unwrap();
        drop(log);

        let reg = Registry::open(&state).unwrap();
        let nodes = reg.nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            nodes[0].binaries,
            [BinaryFact {
                name: "app".into(),
                version: "latest".into(),
                hash: "ab".into()
            }]
        );
        assert_eq!(nodes[0].last_seen, "2026-01-01T00:00:09Z");
        assert_eq!(nodes[0].registered, "2026-01-01T00:00:00Z");
        assert_eq!(
            fs::metadata(dir.join("state.json.log")).unwrap().len(),
            0,
            "log folded into the snapshot"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fold_interrupted_by_a_crash_loses_nothing() {
        let dir = std::env::temp_dir().join(format!("bin-manager-fold-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = dir.join("state.json");
        let reg = Registry::open(&state).unwrap();
        register(
            &reg,
            Node {
                name: "n1".into(),
                ..Node::default()
            },
            "t1",
        );
        drop(reg);
        // As if killed mid-fold: the old log set aside, a new one started, the
        // snapshot not yet rewritten.
        fs::rename(
            dir.join("state.json.log"),
            dir.join("state.json.log.folding"),
        )
        .unwrap();
        fs::write(
            dir.join("state.json.log"),
            "{\"op\":\"report\",\"node\":\"n1\",\"bin\":\"app\",\"hash\":\"ab\",\"at\":\"t2\"}\n",
        )
        .unwrap();
        let reg = Registry::open(&state).unwrap();
        let nodes = reg.nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].binaries[0].hash, "ab");
        assert!(!dir.join("state.json.log.folding").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_keeps_its_token_and_no_other_host_speaks_for_it() {
        let dir = std::env::temp_dir().join(format!("bin-manager-tokens-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = dir.join("state.json");
        let reg = Registry::open(&state).unwrap();
        let node = |os: &str| Node {
            name: "n1".into(),
            os_release: os.into(),
            ..Node::default()
        };
        let required = Policy {
            require_tokens: true,
            ..OPEN
        };
        let Registered::Stored { token, .. } = reg
            .register(node("a"), None, "t-1", &required, "t")
            .unwrap()
        else {
            panic!("first registration refused")
        };
        assert_eq!(token.as_deref(), Some("t-1"));
        // Without, or with a wrong token: refused, nothing changed.
        for (presented, why) in [
            (None, TokenCheck::Missing),
            (Some("t-2"), TokenCheck::Wrong),
        ] {
            match reg
                .register(node("b"), presented, "t-3", &required, "t")
                .unwrap()
            {
                Registered::Refused(c) => assert_eq!(c, why),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                reg.report("n1", "app", "ab", presented, &required, "t")
                    .unwrap(),
                Reported::Refused(why)
            );
            assert_eq!(
                reg.heartbeat("n1", presented, &required, "t").unwrap_err(),
                why
            );
        }
        // A wrong token is refused even where tokens are not required.
        assert!(matches!(
            reg.register(node("c"), Some("t-2"), "t-3", &OPEN, "t")
                .unwrap(),
            Registered::Refused(TokenCheck::Wrong)
        ));
        assert_eq!(reg.nodes()[0].os_release, "a");
        // With it: stored, and no new token.
        let Registered::Stored { token, .. } = reg
            .register(node("d"), Some("t-1"), "t-4", &required, "t")
            .unwrap()
        else {
            panic!("refused with the right token")
        };
        assert_eq!(token, None);
        // Reset by an admin: the next registration gets a new token; on disk
        // only hashes, in files of mode 0600.
        reg.amend("n1", |n| n.token_hash.clear()).unwrap().unwrap();
        drop(reg);
        let reg = Registry::open(&state).unwrap();
        let Registered::Stored { token, .. } = reg
            .register(node("e"), None, "t-5", &required, "t")
            .unwrap()
        else {
            panic!("refused after a reset")
        };
        assert_eq!(token.as_deref(), Some("t-5"));
        reg.flush_seen().unwrap();
        for file in ["state.json", "state.json.log"] {
            let text = fs::read_to_string(dir.join(file)).unwrap();
            assert!(!text.contains("t-5"), "{file} holds a token");
            let mode = fs::metadata(dir.join(file)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        // Full: a new node is refused, a known one still registers.
        let one = Policy {
            max_nodes: 1,
            ..OPEN
        };
        let other = Node {
            name: "n2".into(),
            ..Node::default()
        };
        assert!(matches!(
            reg.register(other, None, "t-6", &one, "t").unwrap(),
            Registered::Full
        ));
        assert!(matches!(
            reg.register(node("f"), Some("t-5"), "t-7", &one, "t")
                .unwrap(),
            Registered::Stored { .. }
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn folds_run_beside_requests_and_lose_nothing() {
        let dir = std::env::temp_dir().join(format!("bin-manager-bgfold-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = dir.join("state.json");
        let mut reg = Registry::open(&state).unwrap();
        reg.compact_at = 1024; // a fold every few registrations
        for i in 0..60 {
            let node = Node {
                name: format!("n{i:02}"),
                cpu_arch: "x86_64".into(),
                ..Node::default()
            };
            register(&reg, node, "t1");
        }
        // The last fold finishes on its own thread (bounded wait).
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while reg.lock().folding && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!reg.lock().folding, "a fold did not finish within 20 s");
        assert!(!dir.join("state.json.log.folding").exists());
        let log = fs::metadata(dir.join("state.json.log")).unwrap().len();
        assert!(log < 60 * 50, "the log was never folded: {log} bytes");
        let snapshot = fs::read_to_string(&state).unwrap();
        assert!(snapshot.contains("\"n00\""), "{snapshot}");
        drop(reg);
        let reg = Registry::open(&state).unwrap();
        let names: Vec<String> = reg.nodes().iter().map(|n| n.name.clone()).collect();
        let want: Vec<String> = (0..60).map(|i| format!("n{i:02}")).collect();
        assert_eq!(names, want);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fold_after_a_failed_one_keeps_the_lines_set_aside() {
        let dir = std::env::temp_dir().join(format!("bin-manager-refold-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let files = Files {
            snapshot: dir.join("state.json"),
            log: dir.join("state.json.log"),
            folded: dir.join("state.json.log.folding"),
        };
        let line = |name: &str| {
            format!(
                "{{\"op\":\"node\",\"node\":{}}}\n",
                Node {
                    name: name.into(),
                    ..Node::default()
                }
                .to_json()
                .to_compact()
            )
        };
        // An earlier fold set n1's line aside (its last line torn by a crash)
        // and never wrote the snapshot; n2 came after, in the new log.
        fs::write(&files.folded, format!("{}{{\"op\":\"no", line("n1"))).unwrap();
        fs::write(&files.log, line("n2")).unwrap();
        set_log_aside(&files).unwrap();
        assert!(!files.log.exists());
        assert_eq!(
            fs::read_to_string(&files.folded).unwrap(),
            format!("{}{{\"op\":\"no\n{}", line("n1"), line("n2"))
        );
        // A crash now: the next start finds both nodes.
        let reg = Registry::open(&files.snapshot).unwrap();
        let names: Vec<String> = reg.nodes().iter().map(|n| n.name.clone()).collect();
        assert_eq!(names, ["n1", "n2"]);
        assert!(!files.folded.exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
