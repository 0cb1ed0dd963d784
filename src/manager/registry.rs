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

pub use super::record::Node;
use super::rollout::Rollout;
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

mod writes;
pub use writes::{Policy, Registered, Reported};

/// The log is folded into the snapshot when it grows past this, or past
/// the snapshot's own size when that is larger: a fold rewrites the whole
/// snapshot, so folding a log smaller than it would write the fleet many
/// times over while it grows (100,000 registrations of 50 binaries: 21
/// rewrites of a 400 MB snapshot). With the log bounded by the snapshot,
/// each byte is written at most about twice more, and a restart replays
/// at most a snapshot's worth of log.
const COMPACT_AT: u64 = 8 << 20;

/// What the registry holds: the nodes and the rollouts.
#[derive(Clone, Default)]
struct Fleet {
    /// Nodes by name; an `Arc` each so that a snapshot is a cheap map clone.
    nodes: BTreeMap<String, Arc<Node>>,
    /// The latest rollout of each binary, by [`Rollout::key`].
    rollouts: BTreeMap<String, Rollout>,
}

struct Inner {
    fleet: Fleet,
    /// Nodes whose lastSeen changed since the last batch was written.
    seen: BTreeSet<String>,
    log: Arc<File>,
    log_len: u64,
    /// The snapshot's size after the last fold.
    snapshot_len: u64,
    /// A fold is running (at most one at a time).
    folding: bool,
    /// `--database`: the log is PostgreSQL's `registry_log` instead (the
    /// file `log` is then `/dev/null`, never written), read through.
    db: Option<super::database::Database>,
    /// The last `registry_log` line applied.
    seq: i64,
    /// The database failed at the last read (logged once, until it answers).
    db_down: bool,
}

impl Inner {
    /// Applies the database's lines written since the last (by any
    /// replica). When it cannot be read the view stays as it was: logged
    /// once, and the writes meanwhile answer 503.
    fn catch_up(&mut self) {
        let Some(db) = &mut self.db else { return };
        match db.since(self.seq) {
            Ok(lines) => {
                if self.db_down {
                    crate::info!("database {} answers again", db.shown());
                    self.db_down = false;
                }
                for (seq, op) in lines {
                    apply_line(&mut self.fleet, seq, &op);
                    self.seq = seq;
                }
            }
            Err(e) if !self.db_down => {
                crate::error!("{e}; serving the fleet as last read, refusing writes with 503");
                self.db_down = true;
            }
            Err(_) => {}
        }
    }
}

/// Applies one line of `registry_log`.
fn apply_line(fleet: &mut Fleet, seq: i64, op: &str) {
    match json::parse(op) {
        Ok(op) => apply(fleet, &op),
        Err(e) => crate::warn!("ignoring a damaged registry_log line {seq}: {e}"),
    }
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
        let mut fleet = Fleet::default();
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
                        fleet.nodes.insert(node.name.clone(), Arc::new(node));
                    }
                }
                if let Some(Value::Arr(items)) = doc.get("rollouts") {
                    for item in items {
                        let r = Rollout::from_json(item).map_err(|msg| Error::Config {
                            path: state_file.to_path_buf(),
                            msg,
                        })?;
                        fleet.rollouts.insert(r.key(), r);
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
                    Ok(op) => apply(&mut fleet, &op),
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
                fleet,
                seen: BTreeSet::new(),
                log: Arc::new(log),
                log_len,
                snapshot_len: 0,
                folding: false,
                db: None,
                seq: 0,
                db_down: false,
            })),
        };
        // Start from a compact state: fold whatever the logs held.
        registry.lock().folding = true;
        fold(&registry.files, &registry.inner)?;
        Ok(registry)
    }

    /// Opens the registry kept in PostgreSQL at `url` (migrating its
    /// schema), replaying every line written so far.
    pub fn open_database(url: &str) -> Result<Registry> {
        let mut db = super::database::Database::open(url)?;
        let mut fleet = Fleet::default();
        let mut seq = 0;
        for (s, op) in db.since(0)? {
            apply_line(&mut fleet, s, &op);
            seq = s;
        }
        let null = Path::new("/dev/null");
        let log = OpenOptions::new()
            .append(true)
            .open(null)
            .map_err(|e| Error::io("opening", null, e))?;
        Ok(Registry {
            files: Arc::new(Files {
                snapshot: null.to_path_buf(),
                log: null.to_path_buf(),
                folded: null.to_path_buf(),
            }),
            compact_at: u64::MAX,
            inner: Arc::new(Mutex::new(Inner {
                fleet,
                seen: BTreeSet::new(),
                log: Arc::new(log),
                log_len: 0,
                snapshot_len: 0,
                folding: true, // never: the database keeps the log
                db: Some(db),
                seq,
                db_down: false,
            })),
        })
    }

    /// The database the registry lives in (for the start-up line).
    pub fn database(&self) -> Option<String> {
        lock(&self.inner).db.as_ref().map(|d| d.shown().to_string())
    }

    /// How many nodes are known.
    pub fn len(&self) -> usize {
        self.lock().fleet.nodes.len()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
                            .fleet
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
        self.lock().fleet.nodes.values().cloned().collect()
    }

    /// One node's record.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.lock().fleet.nodes.get(name).cloned()
    }

    /// The latest rollout of the binary at `key` ([`Rollout::key`]).
    pub fn rollout(&self, key: &str) -> Option<Rollout> {
        self.lock().fleet.rollouts.get(key).cloned()
    }

    /// Every binary's latest rollout, by key.
    pub fn rollouts(&self) -> Vec<Rollout> {
        self.lock().fleet.rollouts.values().cloned().collect()
    }

    /// Stores a rollout durably if the stored one still has revision
    /// `expected` (0: there is none): a conditional update, so that two
    /// requests (or replicas) that read the same revision cannot both
    /// change it. `Ok(false)` when it was changed meanwhile.
    pub fn put_rollout(&self, rollout: &Rollout, expected: u64) -> Result<bool> {
        let key = rollout.key();
        let mut fresh = true;
        let op = Value::obj([
            ("op", Value::str("rollout")),
            ("rollout", rollout.to_json()),
        ]);
        self.commit_if(
            |inner| {
                let current = inner.fleet.rollouts.get(&key).map_or(0, |r| r.revision);
                fresh = current == expected;
                fresh.then(|| op.clone())
            },
            |inner, op| apply(&mut inner.fleet, op),
        )?;
        Ok(fresh)
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

    /// [`Registry::commit`], where `make` may decide under the lock that
    /// there is nothing to write (`None`).
    fn commit_if(
        &self,
        make: impl FnOnce(&mut Inner) -> Option<Value>,
        then: impl FnOnce(&mut Inner, &Value),
    ) -> Result<()> {
        if lock(&self.inner).db.is_some() {
            return self.commit_to_database(make, then);
        }
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
            let fold =
                fold_due(inner.log_len, inner.snapshot_len, self.compact_at) && !inner.folding;
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

    /// [`Registry::commit_if`] with the log in PostgreSQL: under the
    /// registry's lock and the database's write lock, catches up with the
    /// other replicas' lines, decides, appends and commits; applies the line
    /// only once it is committed.
    fn commit_to_database(
        &self,
        make: impl FnOnce(&mut Inner) -> Option<Value>,
        then: impl FnOnce(&mut Inner, &Value),
    ) -> Result<()> {
        let mut inner = lock(&self.inner);
        // Put back below before the lock is released (panic = abort).
        let mut db = inner.db.take().expect("database mode");
        let mut made = None;
        let after = inner.seq;
        let result = db.append(after, |lines| {
            for (seq, op) in &lines {
                apply_line(&mut inner.fleet, *seq, op);
            }
            let op = make(&mut inner)?;
            let line = op.to_compact();
            made = Some(op);
            Some(line)
        });
        inner.db = Some(db);
        inner.seq = result?;
        if let Some(op) = made {
            then(&mut inner, &op);
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

    /// The registry, up to date with the database's lines in database mode.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut inner = lock(&self.inner);
        inner.catch_up();
        inner
    }
}

/// Whether a log of `log_len` bytes is due to be folded into a snapshot of
/// `snapshot_len` bytes (see [`COMPACT_AT`]).
fn fold_due(log_len: u64, snapshot_len: u64, compact_at: u64) -> bool {
    log_len > compact_at.max(snapshot_len)
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
        let fleet = {
            let mut inner = lock(inner);
            set_log_aside(files)?;
            inner.log = Arc::new(open_log(&files.log)?);
            inner.log_len = 0;
            inner.fleet.clone()
        };
        fsutil::atomic_write_with(&files.snapshot, fsutil::Mode::Force(0o600), &mut |w| {
            w.write_all(b"{\"nodes\":[\n")?;
            for (i, node) in fleet.nodes.values().enumerate() {
                if i > 0 {
                    w.write_all(b",\n")?;
                }
                w.write_all(node.to_stored().to_compact().as_bytes())?;
            }
            w.write_all(b"\n],\"rollouts\":[\n")?;
            for (i, r) in fleet.rollouts.values().enumerate() {
                if i > 0 {
                    w.write_all(b",\n")?;
                }
                w.write_all(r.to_json().to_compact().as_bytes())?;
            }
            w.write_all(b"\n]}\n")
        })?;
        let written = fs::metadata(&files.snapshot).map_or(0, |m| m.len());
        lock(inner).snapshot_len = written;
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

/// Applies one log line to the fleet. Idempotent.
fn apply(fleet: &mut Fleet, op: &Value) {
    let s = |k: &str| op.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let nodes = &mut fleet.nodes;
    match op.get("op").and_then(Value::as_str) {
        Some("rollout") => match op.get("rollout").map(Rollout::from_json) {
            Some(Ok(r)) => {
                fleet.rollouts.insert(r.key(), r);
            }
            Some(Err(e)) => crate::warn!("ignoring a damaged rollout record: {e}"),
            None => {}
        },
        Some("node") => {
            if let Some(node) = op.get("node").and_then(|n| Node::from_stored(n).ok()) {
                nodes.insert(node.name.clone(), Arc::new(node));
            }
        }
        Some("report") => {
            if let Some(node) = nodes.get_mut(&s("node")).map(Arc::make_mut) {
                let (bin, hash) = (s("bin"), s("hash"));
                if !node.hash_of(&bin).eq_ignore_ascii_case(&hash) {
                    node.since.insert(bin.clone(), s("at"));
                }
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
    use crate::manager::identity::TokenCheck;

    const OPEN: Policy = Policy {
        require_tokens: false,
        manual_admission: false,
        max_nodes: 100,
    };

    fn register(reg: &Registry, node: Node, now: &str) -> Registered {
        reg.register(node, None, "fresh-token", &OPEN, now).unwrap()
    }

    fn update(
        reg: &Registry,
        name: &str,
        now: &str,
        create: bool,
        f: impl FnOnce(&mut Node),
    ) -> Option<Node> {
        match reg.update_node(name, now, create, None, &OPEN, f).unwrap() {
            Registered::Stored { node, .. } => Some(*node),
            _ => None,
        }
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
    fn update_node_writes_only_changes() {
        let dir = std::env::temp_dir().join(format!("bin-manager-update-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let state = dir.join("state.json");
        let reg = Registry::open(&state).unwrap();
        let log_len = || fs::metadata(dir.join("state.json.log")).unwrap().len();
        assert!(update(&reg, "n1", "t1", false, |_| {}).is_none());
        assert_eq!(log_len(), 0, "nothing created without `create`");
        let set = |n: &mut Node| n.os_release = "OS 1".into();
        let stored = update(&reg, "n1", "t1", true, set).unwrap();
        assert_eq!(
            (stored.registered.as_str(), stored.os_release.as_str()),
            ("t1", "OS 1")
        );
        let written = log_len();
        assert!(written > 0);
        // The same facts again (an agent that posts them every run): only
        // lastSeen changes, in memory, batched like a heartbeat.
        let again = update(&reg, "n1", "t2", true, set).unwrap();
        assert_eq!((again.last_seen.as_str(), log_len()), ("t2", written));
        update(&reg, "n1", "t3", false, |n| n.os_release = "OS 2".into()).unwrap();
        assert!(log_len() > written);
        drop(reg);
        let reg = Registry::open(&state).unwrap();
        let n = reg.node("n1").unwrap();
        assert_eq!(
            (n.os_release.as_str(), n.registered.as_str()),
            ("OS 2", "t1")
        );
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
    fn the_log_folds_past_the_threshold_or_the_snapshot_whichever_is_larger() {
        assert!(!fold_due(100, 0, 100));
        assert!(fold_due(101, 0, 100));
        assert!(!fold_due(500, 500, 100));
        assert!(fold_due(501, 500, 100));
        assert!(fold_due(101, 50, 100));
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
        // The first registrations were folded out of the log into the
        // snapshot. (How much is left in the log depends on how fast the
        // fold thread ran beside the registrations: not asserted.)
        let log = fs::read_to_string(dir.join("state.json.log")).unwrap();
        assert!(!log.contains("\"n00\""), "the log was never folded: {log}");
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
