//! The agent's own small state file, beside the manifest
//! (`bin-manifests.json.state`): a cache of file hashes keyed by what `stat`
//! says, so that an idle run does not re-read every binary every minute, and
//! the builds held back because they failed here, the node token the
//! server issued (so the file is mode 0600, always), and the counters the
//! metrics file reports. Losing it costs one re-hash and one retry (and
//! restarts the counters) — and, where the server requires node tokens, an
//! admin's `bin-manager node reset` — never correctness, so a damaged file
//! is logged and ignored.

use crate::error::Result;
use crate::fsutil;
use crate::hash;
use crate::json::{self, Value};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What [`State::cached_hash`] knows of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    /// There is no file.
    Missing,
    /// Its md5, remembered for the file as `stat` shows it now.
    Known(String),
    /// A file the cache does not know as it is now (never hashed, or
    /// changed since): its stamp, to remember its hash by once read.
    Unread(Stamp),
}

/// What `stat` said about a file when it was hashed. Any change to size,
/// inode, mtime or ctime (which no tool can set back) means "hash again".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of a file as it is now.
    pub fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.size(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A build that failed on this node; not retried until the server publishes
/// another hash or an operator runs `bin-proxy retry NAME`.
#[derive(Clone, Debug, PartialEq)]
pub struct Quarantined {
    /// Binary name.
    pub name: String,
    /// The failed md5.
    pub hash: String,
    /// Why, one line.
    pub error: String,
    /// When, RFC 3339 UTC.
    pub at: String,
}

/// The journal entry of an upgrade in flight: written (durably) before the
/// swap, removed once the new build is committed or rolled back. Finding one
/// at the start of a run means the previous run was killed in between.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// Binary name.
    pub name: String,
    /// md5 of the build being replaced ("" for a fresh install).
    pub old: String,
    /// md5 of the build being swapped in.
    pub new: String,
    /// When the swap started, RFC 3339 UTC.
    pub at: String,
}

/// The journal entry of a download cut off (timeout, broken connection,
/// kill, reboot): its temp file stays beside the target and the next run
/// asks only for the rest. `bytes` are on disk and fsynced before the entry
/// says so; bytes past them are cut off before resuming.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// Binary name.
    pub name: String,
    /// Where it was downloaded from (another URL starts over).
    pub url: String,
    /// The temp file.
    pub file: PathBuf,
    /// The published md5 it is downloaded against (another build starts over).
    pub md5: String,
    /// The published sha256, when one was offered.
    pub sha256: Option<String>,
    /// The server's strong ETag, sent back as `If-Range`.
    pub etag: String,
    /// The whole file's length, as announced.
    pub size: Option<u64>,
    /// Bytes on disk, synced.
    pub bytes: u64,
}

/// A build that could not be put in place because its directory cannot be
/// written (a read-only mount) or its file is a mount point: not downloaded
/// again until the server publishes another hash or the place becomes
/// writable.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    /// Binary name.
    pub name: String,
    /// The published md5 that could not be installed.
    pub hash: String,
    /// The target's directory.
    pub dir: PathBuf,
    /// Why, one line.
    pub why: String,
    /// Since when, RFC 3339 UTC.
    pub at: String,
}

/// The server's request to be left alone (a `429`/`503`): no run asks it
/// anything before `until` (unless told `--now`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Unix seconds: Retry-After plus jitter, at most a day after it was told.
    pub until: u64,
    /// What the server said, one line.
    pub why: String,
}

/// What happened to one binary here over all runs (Prometheus counters:
/// they only grow, across runs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Binary name.
    pub name: String,
    /// Builds installed and confirmed.
    pub upgrades: u64,
    /// Builds that did not come up (and were held back).
    pub failures: u64,
    /// Backups put back (after a failure, or by `rollback`).
    pub rollbacks: u64,
}

/// Which counter to count.
#[derive(Clone, Copy, Debug)]
pub enum Count {
    /// [`Counters::upgrades`]
    Upgrade,
    /// [`Counters::failures`]
    Failure,
    /// [`Counters::rollbacks`]
    Rollback,
}

/// The state file's contents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct State {
    files: Vec<(PathBuf, Stamp, String)>,
    /// Failed builds, held back.
    pub quarantine: Vec<Quarantined>,
    /// Upgrades in flight (at most one per binary).
    pub pending: Vec<Pending>,
    /// The node name and the token the server issued for it.
    node_token: Option<(String, String)>,
    /// Builds held back because their target cannot be replaced.
    pub blocked: Vec<Blocked>,
    /// Per binary, the (resolved) directory its last download was staged
    /// in: where a killed run's temp file is, even after a symlinked
    /// directory was switched to another.
    staged_in: Vec<(String, PathBuf)>,
    /// Per binary, the highest signature serial installed (signed releases:
    /// a lower one is a rollback, refused unless the version is pinned).
    serials: Vec<(String, u64)>,
    /// Per-binary counters for the metrics file.
    pub counters: Vec<Counters>,
    /// Downloads cut off, to resume (at most one per binary).
    pub partials: Vec<Partial>,
    /// Runs that could not reach the server, over all runs.
    pub unreachable_runs: u64,
    /// When a run last ended with nothing failed (Unix seconds).
    pub last_success: Option<u64>,
    /// The back-off the server asked for, if one was asked for.
    backoff: Option<Backoff>,
    /// An API that has no batched check (it answered `POST check` with
    /// 404/405), and when it said so (Unix seconds): see `agent::batch`.
    no_check: Option<(String, u64)>,
    dirty: bool,
}

impl State {
    /// The state file that belongs to a manifest.
    pub fn path_for(manifest: &Path) -> PathBuf {
        let mut p = manifest.as_os_str().to_owned();
        p.push(".state");
        PathBuf::from(p)
    }

    /// Loads the state; a missing file is an empty state, a damaged one is
    /// logged and replaced.
    pub fn load(path: &Path) -> State {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return State::default(),
            Err(e) => {
                crate::warn!("ignoring state file \"{}\": {e}", path.display());
                return State::default();
            }
        };
        match json::parse(&text).ok().and_then(|v| State::from_json(&v)) {
            Some(state) => state,
            None => {
                crate::warn!(
                    "ignoring damaged state file \"{}\"; hashes will be recomputed",
                    path.display()
                );
                State {
                    dirty: true,
                    ..State::default()
                }
            }
        }
    }

    /// Loads a state file, failing on a damaged one (the self-test of a new
    /// agent: it must read the state this one writes). A missing file is an
    /// empty state.
    pub fn load_strict(path: &Path) -> std::result::Result<State, String> {
        match fs::read_to_string(path) {
            Ok(text) => json::parse(&text)
                .ok()
                .and_then(|v| State::from_json(&v))
                .ok_or_else(|| "the state file cannot be read by this agent".to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Journals an upgrade about to swap (replacing any older entry for that
    /// binary). Save before acting on it.
    pub fn set_pending(&mut self, p: Pending) {
        self.pending.retain(|o| o.name != p.name);
        self.pending.push(p);
        self.dirty = true;
    }

    /// The journal entry for a binary, if a run was interrupted mid-upgrade.
    pub fn pending_for(&self, name: &str) -> Option<&Pending> {
        self.pending.iter().find(|p| p.name == name)
    }

    /// Closes a binary's journal entry.
    pub fn clear_pending(&mut self, name: &str) {
        let before = self.pending.len();
        self.pending.retain(|p| p.name != name);
        self.dirty |= self.pending.len() != before;
    }

    /// The partial download of a binary, if one was cut off.
    pub fn partial_for(&self, name: &str) -> Option<&Partial> {
        self.partials.iter().find(|p| p.name == name)
    }

    /// Journals a partial download (replacing an older entry for that
    /// binary). Sync its bytes first, save after.
    pub fn set_partial(&mut self, p: Partial) {
        if self.partial_for(&p.name) == Some(&p) {
            return;
        }
        self.partials.retain(|o| o.name != p.name);
        self.partials.push(p);
        self.dirty = true;
    }

    /// Forgets a binary's partial download (its file is the caller's to remove).
    pub fn clear_partial(&mut self, name: &str) {
        let before = self.partials.len();
        self.partials.retain(|p| p.name != name);
        self.dirty |= self.partials.len() != before;
    }

    /// The token the server issued to `node` (none for another name: the
    /// manifest's node name changed).
    pub fn node_token(&self, node: &str) -> Option<&str> {
        self.node_token
            .as_ref()
            .filter(|(n, _)| n == node)
            .map(|(_, t)| t.as_str())
    }

    /// Keeps the token the server issued to `node`. Save at once: the
    /// server keeps only its hash.
    pub fn set_node_token(&mut self, node: &str, token: &str) {
        if self.node_token(node) != Some(token) {
            self.node_token = Some((node.to_string(), token.to_string()));
            self.dirty = true;
        }
    }

    /// The block of a binary, if one is recorded.
    pub fn blocked_for(&self, name: &str) -> Option<&Blocked> {
        self.blocked.iter().find(|b| b.name == name)
    }

    /// Records a block (replacing an older one for that binary).
    pub fn add_block(&mut self, b: Blocked) {
        self.blocked.retain(|o| o.name != b.name);
        self.blocked.push(b);
        self.dirty = true;
    }

    /// Lifts a binary's block; returns whether there was one.
    pub fn clear_block(&mut self, name: &str) -> bool {
        let before = self.blocked.len();
        self.blocked.retain(|b| b.name != name);
        let changed = self.blocked.len() != before;
        self.dirty |= changed;
        changed
    }

    /// Where a binary's last download was staged.
    pub fn staged_in(&self, name: &str) -> Option<&Path> {
        self.staged_in
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_path())
    }

    /// Remembers where a binary's downloads are staged; `true` when that
    /// changed (and the state must be saved before the download starts).
    /// The highest signature serial installed for `name`.
    pub fn serial(&self, name: &str) -> Option<u64> {
        self.serials
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
    }

    /// Raises the serial floor of `name` to `serial` (never lowers it).
    pub fn raise_serial(&mut self, name: &str, serial: u64) {
        if self.serial(name).is_some_and(|s| s >= serial) {
            return;
        }
        self.serials.retain(|(n, _)| n != name);
        self.serials.push((name.to_string(), serial));
        self.dirty = true;
    }

    /// Sets where `name` was last staged.
    pub fn set_staged_in(&mut self, name: &str, dir: &Path) -> bool {
        if self.staged_in(name) == Some(dir) {
            return false;
        }
        self.staged_in.retain(|(n, _)| n != name);
        self.staged_in.push((name.to_string(), dir.to_path_buf()));
        self.dirty = true;
        true
    }

    /// Adds one to a binary's counter.
    pub fn count(&mut self, name: &str, what: Count) {
        let i = match self.counters.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.counters.push(Counters {
                    name: name.to_string(),
                    ..Counters::default()
                });
                self.counters.len() - 1
            }
        };
        let c = &mut self.counters[i];
        *match what {
            Count::Upgrade => &mut c.upgrades,
            Count::Failure => &mut c.failures,
            Count::Rollback => &mut c.rollbacks,
        } += 1;
        self.dirty = true;
    }

    /// A binary's counters (zeros when it has none yet).
    pub fn counters_of(&self, name: &str) -> Counters {
        self.counters
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .unwrap_or(Counters {
                name: name.to_string(),
                ..Counters::default()
            })
    }

    /// The back-off the server asked for, while it lasts (at `now`).
    pub fn backoff(&self, now: u64) -> Option<&Backoff> {
        self.backoff.as_ref().filter(|b| b.until > now)
    }

    /// Remembers the server's request to wait until `until` (save it).
    pub fn set_backoff(&mut self, until: u64, why: &str) {
        self.backoff = Some(Backoff {
            until,
            why: why.to_string(),
        });
        self.dirty = true;
    }

    /// Forgets the back-off (it passed, or an operator said `--now`).
    pub fn clear_backoff(&mut self) {
        self.dirty |= self.backoff.take().is_some();
    }

    /// Records how a run ended: a success stamps `last_success`, an
    /// unreachable server counts.
    pub fn run_ended(&mut self, ok: bool, unreachable: bool, now: u64) {
        if ok {
            self.last_success = Some(now);
        }
        if unreachable {
            self.unreachable_runs += 1;
        }
        self.dirty |= ok || unreachable;
    }

    /// When `api` last said it has no batched check, if it did.
    pub fn no_check_since(&self, api: &str) -> Option<u64> {
        self.no_check
            .as_ref()
            .filter(|(a, _)| a == api)
            .map(|(_, at)| *at)
    }

    /// Remembers that `api` has no batched check (saved with the state).
    pub fn set_no_check(&mut self, api: &str, at: u64) {
        self.no_check = Some((api.to_string(), at));
        self.dirty = true;
    }

    /// Writes the state atomically if anything changed.
    pub fn save_if_changed(&mut self, path: &Path) -> Result<()> {
        if self.dirty {
            fsutil::atomic_write_with(path, fsutil::Mode::Force(0o600), &mut |w| {
                w.write_all(self.to_json().to_pretty().as_bytes())
            })?;
            self.dirty = false;
        }
        Ok(())
    }

    /// What the cache knows of the file at `path`, without reading it:
    /// its md5 when `stat` shows it unchanged.
    pub fn cached_hash(&mut self, path: &Path) -> Result<Cached> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(path);
                return Ok(Cached::Missing);
            }
            Err(e) => return Err(crate::error::Error::io("inspecting", path, e)),
        };
        let stamp = Stamp::of(&meta);
        Ok(
            match self.files.iter().find(|(p, s, _)| p == path && *s == stamp) {
                Some((_, _, md5)) => Cached::Known(md5.clone()),
                None => Cached::Unread(stamp),
            },
        )
    }

    /// The md5 of the file at `path`, from the cache when `stat` shows it
    /// unchanged, else read and remembered. `None` when there is no file.
    pub fn actual_hash(&mut self, path: &Path) -> Result<Option<String>> {
        match self.cached_hash(path)? {
            Cached::Missing => Ok(None),
            Cached::Known(md5) => Ok(Some(md5)),
            Cached::Unread(stamp) => {
                let md5 = hash::md5_file(path)?;
                self.remember(path, stamp, &md5);
                Ok(Some(md5))
            }
        }
    }

    /// Like [`State::actual_hash`] but never changes the cache (for dry runs).
    pub fn peek_hash(&self, path: &Path) -> Result<Option<String>> {
        let mut scratch = self.clone();
        scratch.actual_hash(path)
    }

    /// Records the hash of a file just written (so it is not read again).
    pub fn remember(&mut self, path: &Path, stamp: Stamp, md5: &str) {
        self.forget(path);
        self.files
            .push((path.to_path_buf(), stamp, md5.to_string()));
        self.dirty = true;
    }

    /// Drops the cached hash of `path`.
    pub fn forget(&mut self, path: &Path) {
        let before = self.files.len();
        self.files.retain(|(p, _, _)| p != path);
        self.dirty |= self.files.len() != before;
    }

    /// The quarantine entry for a binary, if its failed hash is `hash`.
    pub fn quarantined(&self, name: &str, hash: &str) -> Option<&Quarantined> {
        self.quarantine
            .iter()
            .find(|q| q.name == name && hash::same(&q.hash, hash))
    }

    /// Quarantines a failed build (replacing an older entry for that binary).
    pub fn add_quarantine(&mut self, q: Quarantined) {
        self.quarantine.retain(|o| o.name != q.name);
        self.quarantine.push(q);
        self.dirty = true;
    }

    /// Clears a binary's quarantine; returns whether there was one.
    pub fn clear_quarantine(&mut self, name: &str) -> bool {
        let before = self.quarantine.len();
        self.quarantine.retain(|q| q.name != name);
        let changed = self.quarantine.len() != before;
        self.dirty |= changed;
        changed
    }

    fn to_json(&self) -> Value {
        let num = |n: i64| Value::int(n);
        let files = self.files.iter().map(|(p, s, md5)| {
            Value::obj([
                ("path", Value::str(p.display().to_string())),
                ("md5", Value::str(md5)),
                ("size", Value::int(s.size)),
                ("ino", Value::int(s.ino)),
                ("mtime", num(s.mtime.0)),
                ("mtimeNs", num(s.mtime.1)),
                ("ctime", num(s.ctime.0)),
                ("ctimeNs", num(s.ctime.1)),
            ])
        });
        let quarantine = self.quarantine.iter().map(|q| {
            Value::obj([
                ("name", Value::str(&q.name)),
                ("hash", Value::str(&q.hash)),
                ("error", Value::str(&q.error)),
                ("at", Value::str(&q.at)),
            ])
        });
        let pending = self.pending.iter().map(|p| {
            Value::obj([
                ("name", Value::str(&p.name)),
                ("old", Value::str(&p.old)),
                ("new", Value::str(&p.new)),
                ("at", Value::str(&p.at)),
            ])
        });
        let counters = self.counters.iter().map(|c| {
            Value::obj([
                ("name", Value::str(&c.name)),
                ("upgrades", Value::int(c.upgrades)),
                ("failures", Value::int(c.failures)),
                ("rollbacks", Value::int(c.rollbacks)),
            ])
        });
        let last_success = self.last_success.map_or(Value::Null, Value::int);
        let mut top = vec![
            ("files", Value::Arr(files.collect())),
            ("quarantine", Value::Arr(quarantine.collect())),
            ("pending", Value::Arr(pending.collect())),
            ("counters", Value::Arr(counters.collect())),
            ("unreachableRuns", Value::int(self.unreachable_runs)),
            ("lastSuccess", last_success),
        ];
        if !self.blocked.is_empty() {
            let blocked = self.blocked.iter().map(|b| {
                Value::obj([
                    ("name", Value::str(&b.name)),
                    ("hash", Value::str(&b.hash)),
                    ("dir", Value::str(b.dir.display().to_string())),
                    ("why", Value::str(&b.why)),
                    ("at", Value::str(&b.at)),
                ])
            });
            top.push(("blocked", Value::Arr(blocked.collect())));
        }
        if !self.staged_in.is_empty() {
            let staged = self.staged_in.iter().map(|(name, dir)| {
                Value::obj([
                    ("name", Value::str(name)),
                    ("dir", Value::str(dir.display().to_string())),
                ])
            });
            top.push(("stagedIn", Value::Arr(staged.collect())));
        }
        if !self.serials.is_empty() {
            let serials = self.serials.iter().map(|(name, serial)| {
                Value::obj([("name", Value::str(name)), ("serial", Value::int(*serial))])
            });
            top.push(("signedSerials", Value::Arr(serials.collect())));
        }
        if let Some(b) = &self.backoff {
            top.push((
                "serverBackoff",
                Value::obj([("until", Value::int(b.until)), ("why", Value::str(&b.why))]),
            ));
        }
        if let Some((api, at)) = &self.no_check {
            top.push((
                "noCheck",
                Value::obj([("api", Value::str(api)), ("at", Value::int(*at))]),
            ));
        }
        if !self.partials.is_empty() {
            let partials = self.partials.iter().map(|p| {
                Value::obj([
                    ("name", Value::str(&p.name)),
                    ("url", Value::str(&p.url)),
                    ("file", Value::str(p.file.display().to_string())),
                    ("md5", Value::str(&p.md5)),
                    ("sha256", p.sha256.as_ref().map_or(Value::Null, Value::str)),
                    ("etag", Value::str(&p.etag)),
                    ("size", p.size.map_or(Value::Null, Value::int)),
                    ("bytes", Value::int(p.bytes)),
                ])
            });
            top.push(("partialDownloads", Value::Arr(partials.collect())));
        }
        if let Some((name, token)) = &self.node_token {
            top.push((
                "node",
                Value::obj([("name", Value::str(name)), ("token", Value::str(token))]),
            ));
        }
        Value::obj(top)
    }

    fn from_json(v: &Value) -> Option<State> {
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
        let i = |v: &Value, k: &str| v.get(k).and_then(Value::as_i64);
        let list = |k: &str| match v.get(k) {
            Some(Value::Arr(items)) => Some(items.clone()),
            None => Some(Vec::new()),
            _ => None,
        };
        let mut state = State::default();
        for f in list("files")? {
            let stamp = Stamp {
                size: u(&f, "size")?,
                ino: u(&f, "ino")?,
                mtime: (i(&f, "mtime")?, i(&f, "mtimeNs")?),
                ctime: (i(&f, "ctime")?, i(&f, "ctimeNs")?),
            };
            state
                .files
                .push((PathBuf::from(s(&f, "path")?), stamp, s(&f, "md5")?));
        }
        for q in list("quarantine")? {
            state.quarantine.push(Quarantined {
                name: s(&q, "name")?,
                hash: s(&q, "hash")?,
                error: s(&q, "error").unwrap_or_default(),
                at: s(&q, "at").unwrap_or_default(),
            });
        }
        for b in list("blocked")? {
            state.blocked.push(Blocked {
                name: s(&b, "name")?,
                hash: s(&b, "hash")?,
                dir: PathBuf::from(s(&b, "dir")?),
                why: s(&b, "why").unwrap_or_default(),
                at: s(&b, "at").unwrap_or_default(),
            });
        }
        for d in list("stagedIn")? {
            state
                .staged_in
                .push((s(&d, "name")?, PathBuf::from(s(&d, "dir")?)));
        }
        for d in list("signedSerials")? {
            state.serials.push((s(&d, "name")?, u(&d, "serial")?));
        }
        for p in list("partialDownloads")? {
            state.partials.push(Partial {
                name: s(&p, "name")?,
                url: s(&p, "url")?,
                file: PathBuf::from(s(&p, "file")?),
                md5: s(&p, "md5")?,
                sha256: s(&p, "sha256"),
                etag: s(&p, "etag")?,
                size: u(&p, "size"),
                bytes: u(&p, "bytes")?,
            });
        }
        if let Some(node) = v.get("node") {
            state.node_token = Some((s(node, "name")?, s(node, "token")?));
        }
        for p in list("pending")? {
            state.pending.push(Pending {
                name: s(&p, "name")?,
                old: s(&p, "old").unwrap_or_default(),
                new: s(&p, "new")?,
                at: s(&p, "at").unwrap_or_default(),
            });
        }
        for c in list("counters")? {
            state.counters.push(Counters {
                name: s(&c, "name")?,
                upgrades: u(&c, "upgrades").unwrap_or(0),
                failures: u(&c, "failures").unwrap_or(0),
                rollbacks: u(&c, "rollbacks").unwrap_or(0),
            });
        }
        state.unreachable_runs = u(v, "unreachableRuns").unwrap_or(0);
        state.last_success = u(v, "lastSuccess");
        if let Some(b) = v.get("serverBackoff") {
            state.backoff = Some(Backoff {
                until: u(b, "until")?,
                why: s(b, "why").unwrap_or_default(),
            });
        }
        state.no_check = v
            .get("noCheck")
            .and_then(|n| Some((s(n, "api")?, u(n, "at")?)));
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips_and_notices_changes() {
        let dir = std::env::temp_dir().join(format!("bin-proxy-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app");
        let state_path = dir.join("m.json.state");
        fs::write(&file, b"hello world\n").unwrap();

        let mut state = State::load(&state_path);
        assert_eq!(
            state.actual_hash(&file).unwrap().as_deref(),
            Some("6f5902ac237024bdd0c176cb93063dc4")
        );
        state.add_quarantine(Quarantined {
            name: "app".into(),
            hash: "AB".into(),
            error: "e".into(),
            at: "t".into(),
        });
        state.set_pending(Pending {
            name: "app".into(),
            old: "a".into(),
            new: "b".into(),
            at: "t".into(),
        });
        state.set_node_token("n1", "tok");
        state.add_block(Blocked {
            name: "app".into(),
            hash: "cd".into(),
            dir: dir.clone(),
            why: "read-only".into(),
            at: "t".into(),
        });
        assert!(state.set_staged_in("app", &dir));
        assert!(!state.set_staged_in("app", &dir));
        // Mode 0600 always: it holds the node token.
        fs::write(&state_path, b"{}").unwrap();
        fs::set_permissions(
            &state_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        state.count("app", Count::Upgrade);
        state.count("app", Count::Upgrade);
        state.count("app", Count::Rollback);
        state.run_ended(true, true, 1_795_507_201);
        state.save_if_changed(&state_path).unwrap();
        assert_eq!(fs::metadata(&state_path).unwrap().mode() & 0o777, 0o600);

        let mut loaded = State::load(&state_path);
        assert_eq!(loaded.node_token("n1"), Some("tok"));
        assert_eq!(loaded.node_token("renamed"), None);
        assert_eq!(loaded.blocked_for("app"), state.blocked_for("app"));
        assert_eq!(loaded.staged_in("app"), Some(dir.as_path()));
        assert_eq!(loaded.files, state.files);
        let c = loaded.counters_of("app");
        assert_eq!((c.upgrades, c.failures, c.rollbacks), (2, 0, 1));
        assert_eq!(loaded.counters_of("other").upgrades, 0);
        assert_eq!(
            (loaded.unreachable_runs, loaded.last_success),
            (1, Some(1_795_507_201))
        );
        assert!(loaded.quarantined("app", "ab").is_some());
        assert_eq!(loaded.pending_for("app").map(|p| p.new.as_str()), Some("b"));
        loaded.clear_pending("app");
        assert!(loaded.pending_for("app").is_none());
        // Same size, different bytes: mtime/ctime give it away.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&file, b"HELLO WORLD\n").unwrap();
        assert_eq!(
            loaded.actual_hash(&file).unwrap().as_deref(),
            Some("2cad20c19a8eb9bb11a9f76527aec9bc")
        );
        fs::remove_file(&file).unwrap();
        assert_eq!(loaded.actual_hash(&file).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_file_is_ignored() {
        let dir = std::env::temp_dir().join(format!("bin-proxy-state-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        fs::write(&p, b"{not json").unwrap();
        let mut s = State::load(&p);
        assert_eq!(
            s,
            State {
                dirty: true,
                ..State::default()
            }
        );
        // The damaged file is replaced by a valid one on the next save.
        s.save_if_changed(&p).unwrap();
        assert_eq!(State::load(&p), State::default());
        // A record missing a required key damages the whole file.
        fs::write(&p, br#"{"quarantine":[{"hash":"ab"}]}"#).unwrap();
        assert!(State::load(&p).dirty);
        fs::write(&p, br#"{"files":[{"path":"/x","md5":"ab","size":1,"ino":2,"mtime":3,"mtimeNs":4,"ctime":5}]}"#).unwrap();
        assert!(State::load(&p).dirty);
        fs::write(&p, br#"{"files":7}"#).unwrap();
        assert!(State::load(&p).dirty);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn q(name: &str, hash: &str) -> Quarantined {
        Quarantined {
            name: name.into(),
            hash: hash.into(),
            error: "e".into(),
            at: "t".into(),
        }
    }

    fn p(name: &str, new: &str) -> Pending {
        Pending {
            name: name.into(),
            old: "o".into(),
            new: new.into(),
            at: "t".into(),
        }
    }

    #[test]
    fn quarantine_matches_name_and_hash_and_keeps_other_binaries() {
        let mut s = State::default();
        s.add_quarantine(q("app", "aa"));
        s.add_quarantine(q("tool", "bb"));
        assert_eq!(
            s.quarantined("app", "AA").map(|q| q.hash.as_str()),
            Some("aa")
        );
        assert!(
            s.quarantined("app", "bb").is_none(),
            "same name, other hash"
        );
        assert!(
            s.quarantined("tool", "aa").is_none(),
            "same hash, other name"
        );
        // Replacing app's entry keeps tool's.
        s.add_quarantine(q("app", "cc"));
        assert!(s.quarantined("app", "aa").is_none());
        assert!(s.quarantined("app", "cc").is_some());
        assert!(s.quarantined("tool", "bb").is_some());
        assert_eq!(s.quarantine.len(), 2);
        s.dirty = false;
        assert!(s.clear_quarantine("app"));
        assert!(s.dirty);
        s.dirty = false;
        assert!(!s.clear_quarantine("app"));
        assert!(!s.dirty);
        assert!(s.quarantined("tool", "bb").is_some());
    }

    #[test]
    fn pending_and_blocks_replace_per_binary() {
        let mut s = State::default();
        s.set_pending(p("app", "v1"));
        s.set_pending(p("tool", "t1"));
        s.set_pending(p("app", "v2"));
        assert_eq!(s.pending_for("app").map(|p| p.new.as_str()), Some("v2"));
        assert_eq!(s.pending_for("tool").map(|p| p.new.as_str()), Some("t1"));
        assert_eq!(s.pending.len(), 2);
        s.dirty = false;
        s.clear_pending("nothing");
        assert!(!s.dirty);
        s.clear_pending("app");
        assert!(s.dirty);
        assert!(s.pending_for("app").is_none());
        assert!(s.pending_for("tool").is_some());

        let b = |name: &str, hash: &str| Blocked {
            name: name.into(),
            hash: hash.into(),
            dir: PathBuf::from("/ro"),
            why: "w".into(),
            at: "t".into(),
        };
        s.add_block(b("app", "h1"));
        s.add_block(b("tool", "h2"));
        s.add_block(b("app", "h3"));
        assert_eq!(s.blocked_for("app").map(|b| b.hash.as_str()), Some("h3"));
        assert_eq!(s.blocked.len(), 2);
        s.dirty = false;
        assert!(!s.clear_block("nothing"));
        assert!(!s.dirty);
        assert!(s.clear_block("app"));
        assert!(s.dirty);
        assert!(s.blocked_for("app").is_none());
        assert!(s.blocked_for("tool").is_some());
    }

    #[test]
    fn dirty_flag_tracks_real_changes_only() {
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-state-dirty-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let mut s = State::default();
        // Nothing changed: nothing written.
        s.save_if_changed(&path).unwrap();
        assert!(!path.exists());
        s.set_node_token("n1", "tok");
        assert!(s.dirty);
        s.save_if_changed(&path).unwrap();
        assert!(!s.dirty);
        assert!(path.exists());
        s.set_node_token("n1", "tok");
        assert!(!s.dirty, "same token again is no change");
        s.set_node_token("n1", "tok2");
        assert!(s.dirty);
        assert_eq!(s.node_token("n1"), Some("tok2"));
        s.dirty = false;
        s.run_ended(false, false, 5);
        assert!(!s.dirty);
        assert_eq!((s.last_success, s.unreachable_runs), (None, 0));
        s.run_ended(false, true, 5);
        assert!(s.dirty);
        assert_eq!((s.last_success, s.unreachable_runs), (None, 1));
        s.dirty = false;
        s.run_ended(true, false, 6);
        assert!(s.dirty);
        assert_eq!((s.last_success, s.unreachable_runs), (Some(6), 1));
        s.dirty = false;
        s.count("app", Count::Failure);
        assert!(s.dirty);
        s.count("tool", Count::Upgrade);
        s.count("app", Count::Failure);
        let c = s.counters_of("app");
        assert_eq!(
            (c.name.as_str(), c.upgrades, c.failures, c.rollbacks),
            ("app", 0, 2, 0)
        );
        assert_eq!(s.counters_of("tool").upgrades, 1);
        assert_eq!(s.counters_of("new").name, "new");
        s.dirty = false;
        s.forget(&dir.join("never-hashed"));
        assert!(!s.dirty);
        // A write: dirty; a hash from the cache: not dirty.
        let file = dir.join("app");
        fs::write(&file, b"other\n").unwrap();
        assert_eq!(
            s.actual_hash(&file).unwrap().as_deref(),
            Some("ba7790b1708b71cb2b61b1a30d824712")
        );
        assert!(s.dirty);
        s.dirty = false;
        assert_eq!(
            s.actual_hash(&file).unwrap().as_deref(),
            Some("ba7790b1708b71cb2b61b1a30d824712")
        );
        assert!(!s.dirty);
        s.forget(&file);
        assert!(s.dirty);
        assert!(s.files.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cached_hash_never_reads_the_file() {
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-state-cached-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app");
        let mut s = State::default();
        let any = Stamp::of(&fs::metadata(&dir).unwrap());
        s.remember(&dir.join("gone"), any, "beef");
        s.dirty = false;
        assert_eq!(s.cached_hash(&dir.join("gone")).unwrap(), Cached::Missing);
        assert!(s.files.is_empty() && s.dirty, "a missing file is forgotten");
        fs::write(&file, b"other\n").unwrap();
        let stamp = Stamp::of(&fs::metadata(&file).unwrap());
        assert_eq!(s.cached_hash(&file).unwrap(), Cached::Unread(stamp));
        assert!(s.files.is_empty(), "not hashed, not remembered");
        let e = s.cached_hash(&file.join("below-a-file")).unwrap_err();
        assert!(e.to_string().contains("inspecting"), "{e}");
        s.remember(&file, stamp, "cafe");
        assert_eq!(s.cached_hash(&file).unwrap(), Cached::Known("cafe".into()));
        let other = Stamp {
            size: stamp.size + 1,
            ..stamp
        };
        s.remember(&file, other, "cafe");
        assert_eq!(s.cached_hash(&file).unwrap(), Cached::Unread(stamp));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn peek_hash_hashes_without_caching() {
        let dir = std::env::temp_dir().join(format!("bin-proxy-state-peek-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app");
        fs::write(&file, b"other\n").unwrap();
        let s = State::default();
        assert_eq!(
            s.peek_hash(&file).unwrap().as_deref(),
            Some("ba7790b1708b71cb2b61b1a30d824712")
        );
        assert!(s.files.is_empty() && !s.dirty);
        assert_eq!(s.peek_hash(&dir.join("missing")).unwrap(), None);
        // A cached entry is found for the same stamp.
        let mut s = State::default();
        let stamp = Stamp::of(&fs::metadata(&file).unwrap());
        s.remember(&file, stamp, "cafe");
        assert_eq!(s.peek_hash(&file).unwrap().as_deref(), Some("cafe"));
        assert_eq!(s.actual_hash(&file).unwrap().as_deref(), Some("cafe"));
        // A changed stamp means hash again.
        let other = Stamp {
            size: stamp.size + 1,
            ..stamp
        };
        s.remember(&file, other, "cafe");
        assert_eq!(
            s.actual_hash(&file).unwrap().as_deref(),
            Some("ba7790b1708b71cb2b61b1a30d824712")
        );
        assert_eq!(s.files.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn partials_round_trip_replace_per_binary_and_dirty_only_on_change() {
        let part = |name: &str, bytes: u64, sha256: Option<&str>| Partial {
            name: name.into(),
            url: "http://m/api/v1/download/app".into(),
            file: PathBuf::from(format!("/opt/.{name}.1dl.bin-proxy-tmp")),
            md5: "aa".into(),
            sha256: sha256.map(str::to_string),
            etag: "\"aa\"".into(),
            size: Some(1000),
            bytes,
        };
        let mut s = State::default();
        s.set_partial(part("app", 10, Some("bb")));
        s.set_partial(part("tool", 0, None));
        s.set_partial(part("app", 20, Some("bb")));
        assert_eq!(s.partials.len(), 2);
        assert_eq!(s.partial_for("app").map(|p| p.bytes), Some(20));
        let back = State::from_json(&json::parse(&s.to_json().to_pretty()).unwrap()).unwrap();
        assert_eq!(back.partials, s.partials);
        s.dirty = false;
        s.set_partial(part("app", 20, Some("bb")));
        s.clear_partial("none");
        assert!(!s.dirty, "nothing changed");
        s.clear_partial("app");
        assert!(s.dirty);
        assert_eq!(s.partial_for("app"), None);
        // A state without any has no key at all (an idle state file is unchanged).
        assert!(!State::default()
            .to_json()
            .to_pretty()
            .contains("partialDownloads"));
    }

    #[test]
    fn staged_in_is_per_binary() {
        let mut s = State::default();
        assert!(s.set_staged_in("app", Path::new("/a")));
        assert!(s.set_staged_in("tool", Path::new("/t")));
        s.dirty = false;
        assert!(!s.set_staged_in("app", Path::new("/a")));
        assert!(!s.dirty);
        assert!(s.set_staged_in("app", Path::new("/b")));
        assert!(s.dirty);
        assert_eq!(s.staged_in("app"), Some(Path::new("/b")));
        assert_eq!(s.staged_in("tool"), Some(Path::new("/t")));
        assert_eq!(s.staged_in("none"), None);
    }

    #[test]
    fn every_record_survives_a_save_and_a_load() {
        let dir = std::env::temp_dir().join(format!("bin-proxy-state-all-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let mut s = State::default();
        let any = Stamp::of(&fs::metadata(&dir).unwrap());
        s.remember(&dir.join("app"), any, "cafe");
        s.add_quarantine(q("app", "aa"));
        s.set_pending(p("app", "bb"));
        s.set_node_token("n1", "tok");
        s.add_block(Blocked {
            name: "tool".into(),
            hash: "cc".into(),
            dir: PathBuf::from("/ro"),
            why: "read-only".into(),
            at: "t".into(),
        });
        s.set_staged_in("app", Path::new("/opt"));
        s.raise_serial("app", 7);
        s.count("app", Count::Failure);
        s.set_partial(Partial {
            name: "tool".into(),
            url: "http://m/x".into(),
            file: PathBuf::from("/opt/.tool.tmp"),
            md5: "dd".into(),
            sha256: None,
            etag: "\"dd\"".into(),
            size: None,
            bytes: 3,
        });
        s.run_ended(true, true, 42);
        s.set_backoff(99, "429");
        s.set_no_check("http://m/api/v1", 17);
        s.save_if_changed(&path).unwrap();
        assert!(!s.dirty);
        assert_eq!(State::load(&path), s);
        assert_eq!(State::load_strict(&path), Ok(s.clone()));
        // Optional keys left out read as their defaults.
        fs::write(
            &path,
            br#"{"quarantine":[{"name":"a","hash":"h"}],"pending":[{"name":"a","new":"n"}],
                "counters":[{"name":"a"}],"blocked":[{"name":"a","hash":"h","dir":"/d"}]}"#,
        )
        .unwrap();
        let l = State::load(&path);
        assert!(!l.dirty, "a valid file");
        assert_eq!(
            (l.quarantine[0].error.as_str(), l.quarantine[0].at.as_str()),
            ("", "")
        );
        assert_eq!(
            (l.pending[0].old.as_str(), l.pending[0].new.as_str()),
            ("", "n")
        );
        assert_eq!(
            l.counters_of("a"),
            Counters {
                name: "a".into(),
                ..Counters::default()
            }
        );
        assert_eq!(l.blocked_for("a").map(|b| b.why.as_str()), Some(""));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_strict_refuses_what_load_would_ignore() {
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-state-strict-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        assert_eq!(State::load_strict(&path), Ok(State::default()), "missing");
        fs::write(&path, b"{\"files\":7}").unwrap();
        assert_eq!(
            State::load_strict(&path),
            Err("the state file cannot be read by this agent".to_string())
        );
        // Unreadable (a directory): the I/O error, not "damaged".
        let e = State::load_strict(&dir).unwrap_err();
        assert!(e.contains("directory"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signed_serials_only_rise_per_binary() {
        let mut s = State::default();
        assert_eq!(s.serial("app"), None);
        s.raise_serial("app", 5);
        s.raise_serial("tool", 9);
        assert!(s.dirty);
        s.dirty = false;
        s.raise_serial("app", 3);
        s.raise_serial("app", 5);
        assert!(!s.dirty, "a lower or equal serial is no change");
        assert_eq!(s.serial("app"), Some(5));
        s.raise_serial("app", 6);
        assert!(s.dirty);
        assert_eq!((s.serial("app"), s.serial("tool")), (Some(6), Some(9)));
        assert_eq!(s.serials.len(), 2);
    }

    #[test]
    fn no_check_is_remembered_per_api() {
        let mut s = State::default();
        assert_eq!(s.no_check_since("http://m/api/v1"), None);
        s.set_no_check("http://m/api/v1", 17);
        assert!(s.dirty);
        assert_eq!(s.no_check_since("http://m/api/v1"), Some(17));
        assert_eq!(s.no_check_since("http://other/api/v1"), None);
    }

    #[test]
    fn state_path_sits_beside_the_manifest() {
        assert_eq!(
            State::path_for(Path::new("/etc/bin-manifests.json")),
            PathBuf::from("/etc/bin-manifests.json.state")
        );
    }

    #[test]
    fn the_server_backoff_is_kept_until_it_passes() {
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-state-backoff-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        let mut s = State::default();
        assert_eq!(s.backoff(0), None);
        s.clear_backoff();
        assert!(!s.dirty, "nothing to forget: nothing to save");
        s.set_backoff(1, "told before");
        s.clear_backoff();
        assert!(
            s.dirty && s.backoff(0).is_none(),
            "set, then forgotten: still to save"
        );
        s.set_backoff(1000, "503 from http://x/api/v1/bins/app");
        assert!(s.dirty);
        s.save_if_changed(&p).unwrap();
        let mut loaded = State::load(&p);
        assert!(!loaded.dirty);
        let b = loaded.backoff(999).expect("kept across runs");
        assert_eq!(
            (b.until, b.why.as_str()),
            (1000, "503 from http://x/api/v1/bins/app")
        );
        assert_eq!(loaded.backoff(1000), None, "over at its second");
        loaded.clear_backoff();
        assert!(loaded.dirty);
        loaded.save_if_changed(&p).unwrap();
        assert_eq!(State::load(&p).backoff(0), None);
        assert!(!fs::read_to_string(&p).unwrap().contains("serverBackoff"));
        // An entry without its time damages the file, as any other would.
        fs::write(&p, br#"{"serverBackoff":{"why":"x"}}"#).unwrap();
        assert!(State::load(&p).dirty);
        fs::write(&p, br#"{"serverBackoff":{"until":5}}"#).unwrap();
        assert_eq!(State::load(&p).backoff(4).map(|b| b.why.as_str()), Some(""));
        fs::remove_dir_all(&dir).unwrap();
    }
}
