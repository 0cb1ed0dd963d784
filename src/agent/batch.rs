//! The batched check: one `POST check` per run instead of a keepalive and
//! one `bins/NAME` per binary. The request carries the node, its arch and
//! its binaries (names, pinned versions, recorded hashes); the answer holds
//! each binary's `bins/NAME` data, under an `ETag`. The last answer is kept
//! beside the manifest (`bin-manifests.json.check`) and its ETag sent as
//! `If-None-Match`, so an idle run is one request, a `304` and no write.
//!
//! A server without the check (the seed's, the original Go server: `404` or
//! `405`, or a success that holds no `binaries` list) is not an error: the run falls back to the keepalive and the
//! per-binary calls, and the state file remembers for an hour that this
//! API has no check, so that the runs meanwhile go straight to the old
//! calls (saved with the state's other changes: no write of its own).
//! Other failures (unreachable, `5xx`, `429`) are the run's, never a
//! build's; an answer that is no check's (a `401`, garbage) makes this run
//! ask the old way, which tells each binary's error as before.

use super::manifest::Binary;
use super::{tls_hint, CheckIn, Run};
use crate::agent::client::Checked;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::json::{self, Value};
use crate::protocol::{self, BinInfo};
use crate::{debug, info, log, warn};
use std::fs;
use std::path::{Path, PathBuf};

/// How long an API found without the check is asked the old way (seconds).
const NO_CHECK_FOR: u64 = 3600;

/// Where the binaries' answers come from in this run.
#[derive(Debug, Default)]
pub(super) enum Answers {
    /// `GET bins/NAME` for each (a server without the check, or one whose
    /// check could not answer for this node).
    #[default]
    PerBinary,
    /// The check's entries (`bins/NAME` data, or `{name, code, message}`).
    Checked(Vec<Value>),
    /// The check failed as a whole: no binary is checked (told once).
    Failed(Option<Error>),
}

/// Why a binary's answer is missing.
pub(super) enum Missed {
    /// Not this binary's fault: the server could not be asked.
    Unreachable(Error),
    /// What the server answered about this binary: its error.
    Failed(Error),
}

/// The file beside the manifest: the last answer, to which request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cache {
    /// The request's key ([`key`]), the answer's ETag and its `data`.
    answer: Option<(String, String, Value)>,
}

impl Cache {
    /// The cache file that belongs to a manifest.
    pub fn path_for(manifest: &Path) -> PathBuf {
        let mut p = manifest.as_os_str().to_owned();
        p.push(".check");
        PathBuf::from(p)
    }

    /// Loads the cache; a missing or damaged file is an empty cache (it
    /// costs one full answer).
    pub fn load(path: &Path) -> Cache {
        let Ok(text) = fs::read_to_string(path) else {
            return Cache::default();
        };
        let Ok(v) = json::parse(&text) else {
            debug!("ignoring damaged check cache \"{}\"", path.display());
            return Cache::default();
        };
        let answer = v.get("answer").and_then(|a| {
            Some((
                a.get("key")?.as_str()?.to_string(),
                a.get("etag")?.as_str()?.to_string(),
                a.get("data")?.clone(),
            ))
        });
        Cache { answer }
    }

    /// Writes the cache atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut doc = Vec::new();
        if let Some((key, etag, data)) = &self.answer {
            doc.push((
                "answer",
                Value::obj([
                    ("key", Value::str(key)),
                    ("etag", Value::str(etag)),
                    ("data", data.clone()),
                ]),
            ));
        }
        let text = Value::obj(doc).to_pretty();
        fsutil::atomic_write(path, text.as_bytes(), 0o600)
    }

    /// The ETag and data held for the request `key`.
    fn held(&self, key: &str) -> Option<(&str, &Value)> {
        self.answer
            .as_ref()
            .filter(|(k, _, _)| k == key)
            .map(|(_, etag, data)| (etag.as_str(), data))
    }
}

/// Whether an API that said it has no check at `since` is still taken at
/// its word at `now` (for an hour; a clock set back ends it).
fn no_check_holds(since: Option<u64>, now: u64) -> bool {
    since.is_some_and(|at| now >= at && now - at < NO_CHECK_FOR)
}

/// The request's body: the node, its arch and its binaries.
pub fn request(node: &str, arch: &str, bins: &[Binary]) -> Value {
    let bins = bins.iter().map(|b| {
        let mut e = vec![("name", Value::str(&b.name))];
        if let Some(v) = b.pinned_version() {
            e.push(("version", Value::str(v)));
        }
        if !b.hash.is_empty() {
            e.push(("hash", Value::str(&b.hash)));
        }
        Value::obj(e)
    });
    Value::obj([
        ("node", Value::str(node)),
        ("arch", Value::str(arch)),
        ("binaries", Value::Arr(bins.collect())),
    ])
}

/// What the answer to `body` sent to `api` depends on: everything but the
/// recorded hashes, which the server ignores (so an install does not cost
/// the next run a full answer).
pub fn key(api: &str, body: &Value) -> String {
    let mut asked = body.clone();
    if let Value::Obj(fields) = &mut asked {
        for (k, v) in fields.iter_mut() {
            if let (true, Value::Arr(bins)) = (k == "binaries", v) {
                for b in bins {
                    if let Value::Obj(f) = b {
                        f.retain(|(k, _)| k != "hash");
                    }
                }
            }
        }
    }
    let mut md5 = crate::hash::Md5::new();
    md5.update(api.as_bytes());
    md5.update(b"\n");
    md5.update(asked.to_compact().as_bytes());
    md5.hex()
}

/// One binary's answer from the check's entries.
fn entry(url: &str, entries: &[Value], name: &str) -> std::result::Result<BinInfo, Missed> {
    let Some(e) = entries
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    else {
        return Err(Missed::Failed(Error::Protocol {
            url: url.to_string(),
            msg: format!("the answer has no entry for \"{name}\""),
        }));
    };
    if let (Some(code), None) = (e.get("code"), e.get("hash")) {
        // The status bins/NAME would have answered, and its message.
        return Err(Missed::Failed(Error::Server {
            url: url.to_string(),
            status: code
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(0),
            message: protocol::one_line(
                e.get("message").and_then(Value::as_str).unwrap_or(""),
                300,
            ),
        }));
    }
    protocol::bin_info(url, e).map_err(Missed::Failed)
}

impl Run<'_> {
    /// Checks in with one `POST check` (registering first when the server
    /// does not know this node); falls back to the keepalive and per-binary
    /// lookups on a server without it.
    pub(super) fn check_in_batched(&mut self, bins: &[Binary]) -> CheckIn {
        let api = self.client.api.clone();
        let now = log::unix_now();
        if no_check_holds(self.state.no_check_since(&api), now) {
            debug!("{api} has no batched check (it said so within the hour): asking per binary");
            return self.check_in();
        }
        match self.batch(bins, true) {
            Some(checked) => checked,
            None => {
                debug!("{api} has no batched check; asking per binary, and again in an hour");
                self.state.set_no_check(&api, now);
                self.check_in()
            }
        }
    }

    /// One check (and registration, when `may_register` and the server asks
    /// for it). `None`: the server has no check.
    fn batch(&mut self, bins: &[Binary], may_register: bool) -> Option<CheckIn> {
        let body = request(&self.facts.name, &self.client.arch, bins);
        let key = key(&self.client.api, &body);
        let url = format!("{}/check", self.client.api);
        let held = self.cache.held(&key).map(|(e, _)| e.to_string());
        let data = match self.client.check(body.to_compact(), held.as_deref()) {
            Ok(Checked::Unsupported) => return None,
            Ok(Checked::NotModified) => match self.cache.held(&key) {
                Some((_, data)) => {
                    debug!("{url}: not modified since the last run");
                    data.clone()
                }
                None => {
                    return Some(self.ask_old_way(Error::Protocol {
                        url,
                        msg: "304 Not Modified, but no answer is held".into(),
                    }))
                }
            },
            Ok(Checked::Answer { etag, data }) => {
                if !matches!(data.get("binaries"), Some(Value::Arr(_))) {
                    // A seed-style server that answers every POST with a
                    // success: it has no check either.
                    debug!("{url}: a success without a \"binaries\" list");
                    return None;
                }
                let unknown = matches!(data.get("registered"), Some(Value::Bool(false)));
                let tokenless = matches!(data.get("hasNodeToken"), Some(Value::Bool(false)));
                if may_register && (unknown || tokenless) {
                    return Some(self.register_and_check(bins, unknown, data));
                }
                self.keep_answer(key, etag, &data);
                data
            }
            // Manual admission or the node token: the keepalive tells which
            // (pending, refused, or unknown and to be registered).
            Err(Error::Server { status: 403, .. }) if may_register => {
                let found = self.check_in();
                if found.pending || self.token_refused {
                    return Some(found);
                }
                return self.batch(bins, false).or(Some(found));
            }
            Err(e @ Error::Server { status: 403, .. }) => {
                self.node_request_failed("check", e);
                return Some(CheckIn::default()); // each binary asked as today
            }
            // 429/503: the server asks to be left alone; the run backs off.
            Err(e @ Error::Busy { .. }) => {
                return Some(CheckIn {
                    pending: false,
                    error: Some(e),
                })
            }
            Err(e) => match tls_hint::classify(e) {
                // The server is down or overloaded: the run's failure.
                e @ (Error::Http { .. }
                | Error::Tls { .. }
                | Error::Server {
                    status: 429 | 500..,
                    ..
                }) => return Some(self.check_failed(bins, e)),
                // Any other answer that is not a check's (a 400, a 401, one
                // not understood): this run asks the old way, which tells
                // each binary's error as before.
                e => return Some(self.ask_old_way(e)),
            },
        };
        let pending = data.get("admission").and_then(Value::as_str) == Some("pending");
        if let Some(Value::Arr(entries)) = data.get("binaries") {
            self.answers = Answers::Checked(entries.clone());
        }
        Some(CheckIn {
            pending,
            error: None,
        })
    }

    /// The server does not know this node (or holds no token for it):
    /// register, then ask again — with the first answer if registering fails.
    fn register_and_check(&mut self, bins: &[Binary], unknown: bool, data: Value) -> CheckIn {
        let node = self.facts.name.clone();
        match self.client.keepalive_post(&self.registration()) {
            Ok(reg) => {
                if unknown {
                    info!("registered node \"{node}\" with {}", self.client.api);
                } else {
                    info!("node \"{node}\" has no node token on the server; registered again to get one");
                }
                self.take_token(&reg);
                if reg.get("admission").and_then(Value::as_str) == Some("pending") {
                    return CheckIn {
                        pending: true,
                        error: None,
                    };
                }
                self.batch(bins, false).unwrap_or_default()
            }
            Err(e) => {
                self.node_request_failed(&format!("registering node \"{node}\""), e);
                if let Some(Value::Arr(entries)) = data.get("binaries") {
                    self.answers = Answers::Checked(entries.clone());
                }
                CheckIn::default()
            }
        }
    }

    /// The check failed as a whole: the run tells it once, nothing is
    /// blamed on a build.
    fn check_failed(&mut self, bins: &[Binary], e: Error) -> CheckIn {
        if bins.is_empty() {
            return CheckIn {
                pending: false,
                error: Some(e),
            };
        }
        self.answers = Answers::Failed(Some(e));
        CheckIn::default()
    }

    /// An answer that is no check's: this run asks the old way.
    fn ask_old_way(&mut self, e: Error) -> CheckIn {
        warn!("{e}; asking per binary");
        self.check_in()
    }

    /// Keeps an answer with an ETag for the next run (a changed one only).
    fn keep_answer(&mut self, key: String, etag: Option<String>, data: &Value) {
        let kept = etag.map(|etag| (key, etag, data.clone()));
        if kept != self.cache.answer {
            self.cache.answer = kept;
            self.save_cache();
        }
    }

    fn save_cache(&mut self) {
        if let Err(e) = self.cache.save(&self.cache_path) {
            warn!("{e}");
        }
    }

    /// What the server publishes for `bin`: from the check's answer, else
    /// `GET bins/NAME`.
    pub(super) fn remote(&mut self, bin: &Binary) -> std::result::Result<BinInfo, Missed> {
        let url = format!("{}/check", self.client.api);
        match &mut self.answers {
            Answers::Checked(entries) => entry(&url, entries, &bin.name),
            Answers::Failed(e) => Err(Missed::Unreachable(e.take().unwrap_or(Error::Http {
                url,
                msg: "the check failed".into(),
            }))),
            Answers::PerBinary => self
                .client
                .bin_info(&bin.name, bin.pinned_version())
                .map_err(|e| match tls_hint::classify(e) {
                    e @ (Error::Http { .. } | Error::Tls { .. }) => Missed::Unreachable(e),
                    e => Missed::Failed(e),
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(name: &str, version: Option<&str>, hash: &str) -> Binary {
        let text = format!(
            "{{\"binaries\":[{{\"name\":\"{name}\",\"path\":\"/opt/{name}\",\"hash\":\"{hash}\"{}}}]}}",
            version.map_or(String::new(), |v| format!(",\"version\":\"{v}\""))
        );
        let m = crate::agent::manifest::Manifest::parse(&text).expect("manifest");
        m.binaries[0].clone()
    }

    #[test]
    fn request_names_pins_and_hashes_and_the_key_ignores_hashes() {
        let h = "9e107d9d372bb6826bd81d3542a419d6";
        let body = request(
            "web-1",
            "x86_64",
            &[bin("app", Some("1.2"), h), bin("tool", Some("latest"), "")],
        );
        assert_eq!(
            body.to_compact(),
            format!("{{\"node\":\"web-1\",\"arch\":\"x86_64\",\"binaries\":[{{\"name\":\"app\",\"version\":\"1.2\",\"hash\":\"{h}\"}},{{\"name\":\"tool\"}}]}}")
        );
        let other_hash = request("web-1", "x86_64", &[bin("app", Some("1.2"), "")]);
        let same = request("web-1", "x86_64", &[bin("app", Some("1.2"), h)]);
        let other_pin = request("web-1", "x86_64", &[bin("app", Some("1.3"), h)]);
        let api = "http://m/api/v1";
        assert_eq!(key(api, &same), key(api, &other_hash));
        assert_ne!(key(api, &same), key(api, &other_pin));
        assert_ne!(key(api, &same), key("http://n/api/v1", &same));
    }

    #[test]
    fn cache_round_trips_and_the_no_check_mark_expires() {
        assert!(no_check_holds(Some(1000), 1000 + NO_CHECK_FOR - 1));
        assert!(!no_check_holds(Some(1000), 1000 + NO_CHECK_FOR));
        assert!(!no_check_holds(Some(1000), 999), "a clock set back");
        assert!(!no_check_holds(None, 1000));

        let dir = std::env::temp_dir().join(format!("bp-batch-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json.check");
        let data = json::parse(r#"{"registered":true,"binaries":[{"name":"a"}]}"#).unwrap();
        let c = Cache {
            answer: Some(("k".into(), "\"e\"".into(), data)),
        };
        c.save(&path).unwrap();
        let back = Cache::load(&path);
        assert_eq!(back, c);
        assert_eq!(back.held("k").map(|(e, _)| e), Some("\"e\""));
        assert!(back.held("other").is_none());
        // The no-check mark travels in the state file, keyed by the API.
        let state_path = dir.join("m.json.state");
        let mut st = crate::agent::state::State::default();
        st.set_no_check("http://old/api/v1", 1000);
        st.save_if_changed(&state_path).unwrap();
        let st = crate::agent::state::State::load(&state_path);
        assert_eq!(st.no_check_since("http://old/api/v1"), Some(1000));
        assert_eq!(st.no_check_since("http://new/api/v1"), None);
        fs::write(&path, "{not json").unwrap();
        assert_eq!(Cache::load(&path), Cache::default());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_are_bin_info_or_that_binary_s_error() {
        let h = "9e107d9d372bb6826bd81d3542a419d6";
        let entries = json::parse(&format!(
            r#"[{{"name":"a","hash":"{h}","version":"1"}},{{"name":"b","code":404,"message":"binary not found"}}]"#
        ))
        .unwrap();
        let Value::Arr(entries) = entries else {
            unreachable!()
        };
        let url = "http://m/api/v1/check";
        assert!(matches!(entry(url, &entries, "a"), Ok(b) if b.hash == h));
        match entry(url, &entries, "b") {
            Err(Missed::Failed(e)) => assert_eq!(
                e.to_string(),
                "http://m/api/v1/check: server answered 404: binary not found"
            ),
            _ => panic!("b is its own error"),
        }
        assert!(matches!(
            entry(url, &entries, "c"),
            Err(Missed::Failed(Error::Protocol { .. }))
        ));
    }
}
