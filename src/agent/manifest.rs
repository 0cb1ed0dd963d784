//! `bin-manifests.json`: the seed's format plus optional keys. Loading is
//! strict — an unknown key, a duplicate, a relative path or a malformed hash
//! is an error that names the file, the entry and the key — because a typo in
//! a file that drives root-owned binary swaps must never be guessed around.
//! Saving is atomic and pretty-printed so that people can keep using vim on it.

use crate::error::{Error, Result};
use crate::fsutil;
use crate::hash;
use crate::json::{self, Value};
use crate::protocol;
use std::path::{Path, PathBuf};

/// The default manifest location.
pub const DEFAULT_PATH: &str = "/etc/bin-proxy/bin-manifests.json";

/// The whole manifest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifest {
    /// Where the server is (all optional; flags and env win).
    pub manager: Manager,
    /// This node's facts as written (empty ones are detected at run time).
    pub node: Node,
    /// The managed binaries, in file order.
    pub binaries: Vec<Binary>,
    /// `metricsFile`: where each run writes its Prometheus metrics.
    pub metrics_file: Option<PathBuf>,
}

/// The `manager` object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manager {
    /// `api`: base URL of the bin-manager API.
    pub api: Option<String>,
    /// `downloadUrl`: base URL downloads are fetched from.
    pub download_url: Option<String>,
    /// `tokenFile`: file holding the bearer token.
    pub token_file: Option<PathBuf>,
    /// `trustedKeys`: public key files; when set, only builds signed by one
    /// of them (or a key they rotated to) are installed.
    pub trusted_keys: Vec<PathBuf>,
}

/// The `node` object. Missing and empty values are filled from the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    /// `name`
    pub name: Option<String>,
    /// `cpuArch`
    pub cpu_arch: Option<String>,
    /// `osRelease`
    pub os_release: Option<String>,
    /// `proxyVersion` (kept as written; the agent always reports its own).
    pub proxy_version: Option<String>,
    /// `labels`: `{"region": "eu-west", "dc": "fra1"}`, sent with every
    /// registration; staged rollouts can target them.
    pub labels: Vec<(String, String)>,
}

/// One managed binary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Binary {
    /// `name`: the name the server publishes it under.
    pub name: String,
    /// `version`: "latest" (or absent) follows the newest build; anything else pins.
    pub version: Option<String>,
    /// `hash`: md5 of the build last installed here; "" when none yet.
    pub hash: String,
    /// `path`: absolute path of the executable on this host.
    pub path: PathBuf,
    /// `downloadUrl`: where to fetch it instead of the download base.
    pub download_url: Option<String>,
    /// `service`: supervisor program to restart (default: `name`).
    pub service: Option<String>,
    /// `restart`: "supervisor", "none", or a command line.
    pub restart: Option<String>,
    /// `preUpgrade`: command run before the swap; non-zero aborts.
    pub pre_upgrade: Option<String>,
    /// `postUpgrade`: command run after the restart; non-zero rolls back.
    pub post_upgrade: Option<String>,
    /// `confirmSeconds`: how long the restarted program must stay RUNNING
    /// with the same pid (default [`DEFAULT_CONFIRM_SECONDS`]).
    pub confirm_seconds: Option<u64>,
}

/// The supervisor watch window when `confirmSeconds` is not given.
const DEFAULT_CONFIRM_SECONDS: u64 = 3;

impl Binary {
    /// The supervisor program name.
    pub fn service(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }

    /// The pinned version, if any (`latest` and empty mean "follow the newest").
    pub fn pinned_version(&self) -> Option<&str> {
        self.version
            .as_deref()
            .filter(|v| !v.is_empty() && *v != "latest")
    }

    /// The supervisor watch window.
    pub fn confirm_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.confirm_seconds.unwrap_or(DEFAULT_CONFIRM_SECONDS))
    }

    /// `PATH.bak`, where the previous build is kept.
    fn backup_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".bak");
        PathBuf::from(p)
    }
}

/// `node.labels`: an object of short strings (letters, digits, `._-/:`).
fn labels(node: &Value) -> Result<Vec<(String, String)>, String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
    };
    match node.get("labels") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Obj(pairs)) => {
            let mut out = Vec::new();
            for (k, v) in pairs {
                let Some(v) = v.as_str() else {
                    return Err(format!(
                        "\"node\".\"labels\".\"{k}\" must be a string, not {}",
                        v.kind()
                    ));
                };
                if !ok(k) || !ok(v) {
                    return Err(format!(
                        "\"node\".\"labels\": \"{k}\": \"{v}\" is not a label (1 to 128 of letters, digits, '.', '_', '-', '/', ':')"
                    ));
                }
                out.push((k.clone(), v.to_string()));
            }
            Ok(out)
        }
        Some(other) => Err(format!(
            "\"node\".\"labels\" must be an object, not {}",
            other.kind()
        )),
    }
}

const TOP_KEYS: &[&str] = &["manager", "node", "binaries", "metricsFile"];
const MANAGER_KEYS: &[&str] = &["api", "downloadUrl", "tokenFile", "trustedKeys"];
const NODE_KEYS: &[&str] = &["name", "cpuArch", "osRelease", "proxyVersion", "labels"];
const BINARY_KEYS: &[&str] = &[
    "name",
    "version",
    "hash",
    "path",
    "downloadUrl",
    "service",
    "restart",
    "preUpgrade",
    "postUpgrade",
    "confirmSeconds",
];

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Config {
                path: path.to_path_buf(),
                msg: "no manifest here; write one with `bin-proxy init` or name another with --config".into(),
            },
            _ => Error::io("reading manifest", path, e),
        })?;
        let text = String::from_utf8(text).map_err(|_| Error::Config {
            path: path.to_path_buf(),
            msg: "not valid UTF-8".to_string(),
        })?;
        Manifest::parse(&text).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses and validates manifest text; the error names the entry and key.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let doc = json::parse(text).map_err(|e| format!("invalid JSON at {e}"))?;
        let top = object(&doc, "the top level", TOP_KEYS)?;
        let mut m = Manifest::default();
        if let Some(v) = top.get("manager") {
            let o = object(v, "\"manager\"", MANAGER_KEYS)?;
            m.manager.api = o.opt_url("api")?;
            m.manager.download_url = o.opt_url("downloadUrl")?;
            m.manager.token_file = o.opt_str("tokenFile")?.map(PathBuf::from);
            if let Some(v) = o.get("trustedKeys") {
                let err = || {
                    o.bad(
                        "trustedKeys",
                        "must be a list of absolute paths of public key files",
                    )
                };
                let Value::Arr(items) = v else {
                    return Err(err());
                };
                for item in items {
                    match item.as_str() {
                        Some(p) if Path::new(p).is_absolute() => {
                            m.manager.trusted_keys.push(p.into())
                        }
                        _ => return Err(err()),
                    }
                }
            }
            if let Some(f) = &m.manager.token_file {
                if !f.is_absolute() {
                    return Err(o.bad("tokenFile", "must be an absolute path"));
                }
            }
        }
        if let Some(v) = top.get("node") {
            let o = object(v, "\"node\"", NODE_KEYS)?;
            m.node = Node {
                name: o.opt_str("name")?,
                cpu_arch: o.opt_str("cpuArch")?,
                os_release: o.opt_str("osRelease")?,
                proxy_version: o.opt_str("proxyVersion")?,
                labels: labels(v)?,
            };
        }
        m.metrics_file = top.opt_str("metricsFile")?.map(PathBuf::from);
        if m.metrics_file.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(top.bad("metricsFile", "must be an absolute path"));
        }
        let Some(list) = top.get("binaries") else {
            return Err(
                "missing key \"binaries\" (a list, may be empty: \"binaries\": [])".to_string(),
            );
        };
        let Value::Arr(items) = list else {
            return Err(format!("\"binaries\" must be a list, not {}", list.kind()));
        };
        for (i, item) in items.iter().enumerate() {
            let b = binary(item, i)?;
            if let Some(j) = m.binaries.iter().position(|o| o.name == b.name) {
                return Err(format!(
                    "binaries[{i}]: duplicate name \"{}\" (also binaries[{j}])",
                    b.name
                ));
            }
            if let Some(j) = m.binaries.iter().position(|o| {
                o.path == b.path || o.backup_path() == b.path || b.backup_path() == o.path
            }) {
                return Err(format!(
                    "binaries[{i}] (\"{}\"): path \"{}\" collides with binaries[{j}] (\"{}\")",
                    b.name,
                    b.path.display(),
                    m.binaries[j].name
                ));
            }
            m.binaries.push(b);
        }
        Ok(m)
    }

    /// The manifest as pretty JSON, keys in the documented order, absent
    /// optional keys left out.
    pub fn to_json(&self) -> String {
        let opt = |entries: &mut Vec<(String, Value)>, key: &str, v: &Option<String>| {
            if let Some(v) = v {
                entries.push((key.to_string(), Value::str(v.clone())));
            }
        };
        let mut top = Vec::new();
        let mg = &self.manager;
        if mg.api.is_some()
            || mg.download_url.is_some()
            || mg.token_file.is_some()
            || !mg.trusted_keys.is_empty()
        {
            let mut o = Vec::new();
            opt(&mut o, "api", &mg.api);
            opt(&mut o, "downloadUrl", &mg.download_url);
            let token = mg.token_file.as_ref().map(|p| p.display().to_string());
            opt(&mut o, "tokenFile", &token);
            if !mg.trusted_keys.is_empty() {
                let keys = mg
                    .trusted_keys
                    .iter()
                    .map(|p| Value::str(p.display().to_string()));
                o.push(("trustedKeys".to_string(), Value::Arr(keys.collect())));
            }
            top.push(("manager".to_string(), Value::Obj(o)));
        }
        let n = &self.node;
        let mut o = Vec::new();
        opt(&mut o, "name", &n.name);
        opt(&mut o, "cpuArch", &n.cpu_arch);
        opt(&mut o, "osRelease", &n.os_release);
        opt(&mut o, "proxyVersion", &n.proxy_version);
        if !n.labels.is_empty() {
            let labels = n
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::str(v.clone())));
            o.push(("labels".to_string(), Value::Obj(labels.collect())));
        }
        top.push(("node".to_string(), Value::Obj(o)));
        let bins = self.binaries.iter().map(|b| {
            let mut o = vec![("name".to_string(), Value::str(b.name.clone()))];
            opt(&mut o, "version", &b.version);
            o.push(("hash".to_string(), Value::str(b.hash.clone())));
            o.push(("path".to_string(), Value::str(b.path.display().to_string())));
            opt(&mut o, "downloadUrl", &b.download_url);
            opt(&mut o, "service", &b.service);
            opt(&mut o, "restart", &b.restart);
            opt(&mut o, "preUpgrade", &b.pre_upgrade);
            opt(&mut o, "postUpgrade", &b.post_upgrade);
            if let Some(secs) = b.confirm_seconds {
                o.push(("confirmSeconds".to_string(), Value::int(secs)));
            }
            Value::Obj(o)
        });
        top.push(("binaries".to_string(), Value::Arr(bins.collect())));
        if let Some(p) = &self.metrics_file {
            top.push((
                "metricsFile".to_string(),
                Value::str(p.display().to_string()),
            ));
        }
        Value::Obj(top).to_pretty()
    }

    /// Replaces the manifest file atomically, keeping its mode and owner.
    pub fn save(&self, path: &Path) -> Result<()> {
        fsutil::atomic_write(path, self.to_json().as_bytes(), 0o644)
    }
}

/// A validated JSON object with a label for error messages.
struct Obj<'a> {
    entries: &'a [(String, Value)],
    label: String,
}

fn object<'a>(v: &'a Value, label: &str, allowed: &[&str]) -> Result<Obj<'a>, String> {
    let Value::Obj(entries) = v else {
        return Err(format!("{label} must be an object, not {}", v.kind()));
    };
    for (i, (key, _)) in entries.iter().enumerate() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "{label}: unknown key \"{key}\" (known keys: {})",
                allowed.join(", ")
            ));
        }
        if entries[..i].iter().any(|(k, _)| k == key) {
            return Err(format!("{label}: key \"{key}\" appears twice"));
        }
    }
    Ok(Obj {
        entries,
        label: label.to_string(),
    })
}

impl Obj<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn bad(&self, key: &str, what: &str) -> String {
        format!("{}: key \"{key}\" {what}", self.label)
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(key, &format!("must be a string, not {}", v.kind()))),
        }
    }

    /// An optional URL, which must be one the agent can fetch.
    fn opt_url(&self, key: &str) -> Result<Option<String>, String> {
        let url = self.opt_str(key)?;
        match url.as_deref().and_then(protocol::url_problem) {
            Some(problem) => {
                Err(self.bad(key, &format!("\"{}\" {problem}", url.unwrap_or_default())))
            }
            None => Ok(url),
        }
    }

    /// An optional command line, which must split into words (see
    /// [`service::split`](super::service::split)): a mistake such as an
    /// unclosed quote is found now, not after a swap.
    fn opt_command(&self, key: &str) -> Result<Option<String>, String> {
        let cmd = self.opt_str(key)?;
        if let Some(c) = &cmd {
            if let Err(e) = super::service::split(c) {
                return Err(self.bad(key, &format!("cannot be split into words: {e}")));
            }
        }
        Ok(cmd)
    }

    fn opt_seconds(&self, key: &str, max: u64) -> Result<Option<u64>, String> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(self.bad(
                    key,
                    &format!("must be a whole number of seconds from 0 to {max}"),
                )),
            },
        }
    }

    fn req_str(&self, key: &str) -> Result<String, String> {
        match self.opt_str(key)? {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => Err(self.bad(key, "must not be empty")),
            None => Err(format!("{}: missing key \"{key}\"", self.label)),
        }
    }
}

fn binary(v: &Value, i: usize) -> Result<Binary, String> {
    let name = v.get("name").and_then(Value::as_str).unwrap_or("");
    let label = if name.is_empty() {
        format!("binaries[{i}]")
    } else {
        format!("binaries[{i}] (\"{name}\")")
    };
    let o = object(v, &label, BINARY_KEYS)?;
    let name = o.req_str("name")?;
    if name.chars().any(|c| c.is_control() || c == '/') {
        return Err(o.bad("name", "must not contain '/' or control characters"));
    }
    let hash = o.opt_str("hash")?.unwrap_or_default();
    if !hash.is_empty() && !hash::is_md5(&hash) {
        return Err(o.bad(
            "hash",
            &format!("must be 32 hex digits (an md5) or \"\", not \"{hash}\""),
        ));
    }
    let path = o.req_str("path")?;
    if path.chars().any(char::is_control) {
        return Err(o.bad("path", "must not contain control characters"));
    }
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(o.bad(
            "path",
            &format!("must be an absolute path, not \"{}\"", path.display()),
        ));
    }
    if path.file_name().is_none() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(o.bad(
            "path",
            &format!("must name a file, not \"{}\"", path.display()),
        ));
    }
    let restart = o.opt_str("restart")?;
    match restart.as_deref().map(str::trim) {
        None | Some("supervisor" | "none") => {}
        Some("") => {
            return Err(o.bad(
                "restart",
                "must be \"supervisor\", \"none\", \"signal:NAME:PIDFILE\" or a command",
            ));
        }
        Some(r) if r.starts_with("signal:") => {
            if let Err(e) = super::service::Restart::parse(Some(r)) {
                return Err(o.bad("restart", &e));
            }
        }
        Some(_) => drop(o.opt_command("restart")?),
    }
    let service = o.opt_str("service")?;
    let supervised = matches!(restart.as_deref().map(str::trim), None | Some("supervisor"));
    if supervised
        && service
            .as_deref()
            .unwrap_or(&name)
            .contains(char::is_whitespace)
    {
        return Err(o.bad(
            "service",
            "must name a supervisor program without spaces (set \"service\" when the name has one)",
        ));
    }
    Ok(Binary {
        name,
        version: o.opt_str("version")?,
        hash: hash.to_ascii_lowercase(),
        path,
        download_url: o.opt_url("downloadUrl")?,
        service,
        restart,
        pre_upgrade: o.opt_command("preUpgrade")?,
        post_upgrade: o.opt_command("postUpgrade")?,
        confirm_seconds: o.opt_seconds("confirmSeconds", 600)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{
  "node": {
    "name": "web-server-01",
    "cpuArch": "x86_64",
    "osRelease": "Ubuntu 20.04.6 LTS",
    "proxyVersion": "1.0.0"
  },
  "binaries": [
    {
      "name": "myapp",
      "version": "latest",
      "hash": "d41d8cd98f00b204e9800998ecf8427e",
      "path": "/usr/local/bin/myapp"
    }
  ]
}
"#;

    fn check_err(text: &str, expected: &str) {
        match Manifest::parse(text) {
            Ok(m) => panic!("accepted {text}: {m:?}"),
            Err(e) => assert_eq!(e, expected),
        }
    }

    fn with_binary(fields: &str) -> String {
        format!(r#"{{"binaries":[{{"name":"a","path":"/x/a"}}, {{{fields}}}]}}"#)
    }

    #[test]
    fn seed_manifest_round_trips_byte_for_byte() {
        let m = Manifest::parse(SEED).unwrap();
        assert_eq!(m.binaries[0].name, "myapp");
        assert_eq!(m.binaries[0].path, PathBuf::from("/usr/local/bin/myapp"));
        assert_eq!(m.binaries[0].pinned_version(), None);
        assert_eq!(m.to_json(), SEED);
    }

    /// README's manifest table names every key the validator accepts.
    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("## The manifest").unwrap()..];
        let section = &section[..section[3..].find("\n## ").unwrap()];
        let rows: Vec<&str> = section.lines().filter(|l| l.starts_with("| `")).collect();
        let documented = |key: String| {
            rows.iter().any(|r| {
                r.split(" | ")
                    .next()
                    .unwrap_or("")
                    .contains(&format!("`{key}`"))
            })
        };
        let keys = MANAGER_KEYS
            .iter()
            .map(|k| format!("manager.{k}"))
            .chain(NODE_KEYS.iter().map(|k| format!("node.{k}")))
            .chain(BINARY_KEYS.iter().map(|k| k.to_string()))
            .chain(
                TOP_KEYS
                    .iter()
                    .filter(|k| !["manager", "node", "binaries"].contains(k))
                    .map(|k| k.to_string()),
            );
        for key in keys {
            assert!(
                documented(key.clone()),
                "README's manifest table lacks `{key}`"
            );
        }
    }

    #[test]
    fn every_optional_key() {
        let text = r#"{"manager":{"api":"https://m/api/v1","downloadUrl":"https://cdn","tokenFile":"/etc/t","trustedKeys":["/etc/k1.pub","/etc/k2.pub"]},"metricsFile":"/var/lib/node/bp.prom",
            "binaries":[{"name":"a","version":"1.2","hash":"D41D8CD98F00B204E9800998ECF8427E","path":"/x/a",
            "downloadUrl":"http://cdn/a","service":"svc","restart":"none","preUpgrade":"/bin/true","postUpgrade":"/x/a --check","confirmSeconds":10}]}"#;
        let m = Manifest::parse(text).unwrap();
        let b = &m.binaries[0];
        assert_eq!(
            (b.service(), b.pinned_version(), b.hash.as_str()),
            ("svc", Some("1.2"), "d41d8cd98f00b204e9800998ecf8427e")
        );
        assert_eq!(m.manager.token_file, Some(PathBuf::from("/etc/t")));
        assert_eq!(
            m.manager.trusted_keys,
            [PathBuf::from("/etc/k1.pub"), PathBuf::from("/etc/k2.pub")]
        );
        // Rewriting the manifest (after an upgrade) keeps every key, the trusted keys too.
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        let relative = Manifest::parse(r#"{"manager":{"trustedKeys":["k.pub"]},"binaries":[]}"#);
        assert!(relative.unwrap_err().contains("trustedKeys"));
    }

    #[test]
    fn names_paths_and_bounds_are_checked() {
        check_err(
            &with_binary(r#""name":"a/b","path":"/x/b""#),
            "binaries[1] (\"a/b\"): key \"name\" must not contain '/' or control characters",
        );
        check_err(
            &with_binary("\"name\":\"b\\u0007\",\"path\":\"/x/b\""),
            "binaries[1] (\"b\u{7}\"): key \"name\" must not contain '/' or control characters",
        );
        check_err(
            &with_binary(r#""name":"","path":"/x/b""#),
            "binaries[1]: key \"name\" must not be empty",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/""#),
            "binaries[1] (\"b\"): key \"path\" must name a file, not \"/x/\"",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/""#),
            "binaries[1] (\"b\"): key \"path\" must name a file, not \"/\"",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","confirmSeconds":601"#),
            "binaries[1] (\"b\"): key \"confirmSeconds\" must be a whole number of seconds from 0 to 600",
        );
        for secs in [0, 600] {
            let m = Manifest::parse(&with_binary(&format!(
                r#""name":"b","path":"/x/b","confirmSeconds":{secs}"#
            )))
            .unwrap();
            assert_eq!(m.binaries[1].confirm_seconds, Some(secs));
        }
    }

    #[test]
    fn node_labels_are_short_plain_strings() {
        let m = Manifest::parse(
            r#"{"node":{"name":"n","labels":{"zone":"eu-1","k8s.io/role":"a:b_c"}},"binaries":[]}"#,
        )
        .unwrap();
        let pairs = [("zone", "eu-1"), ("k8s.io/role", "a:b_c")];
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(m.node.labels, want);
        assert_eq!(
            Manifest::parse(&m.to_json()).unwrap(),
            m,
            "labels are written back"
        );
        let max = "v".repeat(128);
        let m = Manifest::parse(&format!(
            r#"{{"node":{{"labels":{{"{max}":"{max}"}}}},"binaries":[]}}"#
        ))
        .unwrap();
        assert_eq!(m.node.labels, [(max.clone(), max.clone())]);
        let not_a_label = |k: &str, v: &str| {
            format!("\"node\".\"labels\": \"{k}\": \"{v}\" is not a label (1 to 128 of letters, digits, '.', '_', '-', '/', ':')")
        };
        let long = "v".repeat(129);
        for (k, v) in [
            ("", "x"),
            ("x", ""),
            (long.as_str(), "x"),
            ("x", long.as_str()),
            ("a b", "x"),
            ("x", "a=b"),
        ] {
            check_err(
                &format!(r#"{{"node":{{"labels":{{"{k}":"{v}"}}}},"binaries":[]}}"#),
                &not_a_label(k, v),
            );
        }
        check_err(
            r#"{"node":{"labels":{"zone":1}},"binaries":[]}"#,
            "\"node\".\"labels\".\"zone\" must be a string, not a number",
        );
        check_err(
            r#"{"node":{"labels":["zone"]},"binaries":[]}"#,
            "\"node\".\"labels\" must be an object, not an array",
        );
        let none = Manifest::parse(r#"{"node":{"labels":null},"binaries":[]}"#).unwrap();
        assert!(none.node.labels.is_empty());
    }

    #[test]
    fn binary_defaults() {
        let m = Manifest::parse(&with_binary(r#""name":"b","path":"/x/b","version":"""#)).unwrap();
        let (a, b) = (&m.binaries[0], &m.binaries[1]);
        assert_eq!(a.service(), "a", "the service is the name by default");
        assert_eq!(a.confirm_window(), std::time::Duration::from_secs(3));
        assert_eq!(a.backup_path(), PathBuf::from("/x/a.bak"));
        assert_eq!(
            (a.pinned_version(), b.pinned_version()),
            (None, None),
            "unset and empty"
        );
        let m = Manifest::parse(&with_binary(
            r#""name":"b","path":"/x/b","confirmSeconds":7"#,
        ))
        .unwrap();
        assert_eq!(
            m.binaries[1].confirm_window(),
            std::time::Duration::from_secs(7)
        );
    }

    #[test]
    fn restart_and_service_are_checked() {
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","restart":"  ""#),
            "binaries[1] (\"b\"): key \"restart\" must be \"supervisor\", \"none\", \"signal:NAME:PIDFILE\" or a command",
        );
        let spaced = "binaries[1] (\"my b\"): key \"service\" must name a supervisor program without spaces (set \"service\" when the name has one)";
        check_err(&with_binary(r#""name":"my b","path":"/x/b""#), spaced);
        check_err(
            &with_binary(r#""name":"my b","path":"/x/b","restart":"supervisor""#),
            spaced,
        );
        for ok in [
            r#""name":"my b","path":"/x/b","service":"my_b""#,
            r#""name":"my b","path":"/x/b","restart":"none""#,
            r#""name":"my b","path":"/x/b","restart":"/bin/true""#,
            r#""name":"my b","path":"/x/b","restart":"signal:HUP:/run/b.pid""#,
        ] {
            let m = Manifest::parse(&with_binary(ok)).unwrap();
            assert_eq!(m.binaries[1].name, "my b", "{ok}");
        }
    }

    #[test]
    fn a_path_may_not_be_another_binarys_backup() {
        check_err(
            r#"{"binaries":[{"name":"a","path":"/x/c.bak"},{"name":"b","path":"/x/c"}]}"#,
            "binaries[1] (\"b\"): path \"/x/c\" collides with binaries[0] (\"a\")",
        );
    }

    #[test]
    fn the_manager_section_is_written_when_any_key_is_set() {
        for manager in [
            r#"{"api":"http://m/api/v1"}"#,
            r#"{"downloadUrl":"http://cdn"}"#,
            r#"{"tokenFile":"/etc/t"}"#,
            r#"{"trustedKeys":["/etc/k.pub"]}"#,
        ] {
            let m = Manifest::parse(&format!(
                r#"{{"manager":{manager},"metricsFile":"/m.prom","binaries":[]}}"#
            ))
            .unwrap();
            assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m, "{manager}");
        }
        let bare = Manifest::parse(r#"{"manager":{},"binaries":[]}"#).unwrap();
        assert!(!bare.to_json().contains("manager"));
    }

    #[test]
    fn load_names_the_file_and_the_problem() {
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-manifest-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("m.json") && e.contains("no manifest here"),
            "{e}"
        );
        std::fs::write(&path, b"{\"binaries\":[\"\xff\"]}").unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(e.contains("m.json") && e.contains("not valid UTF-8"), "{e}");
        std::fs::write(&path, b"{}").unwrap();
        let e = Manifest::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("m.json") && e.contains("missing key \"binaries\""),
            "{e}"
        );
        std::fs::write(&path, SEED).unwrap();
        assert_eq!(
            Manifest::load(&path).unwrap(),
            Manifest::parse(SEED).unwrap()
        );
        let e = Manifest::load(&dir).unwrap_err().to_string();
        assert!(e.contains("reading manifest"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn save_replaces_the_file_keeping_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-manifest-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.json");
        let mut m = Manifest::parse(SEED).unwrap();
        m.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SEED);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o644, "a new manifest");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        m.binaries[0].hash = "9e107d9d372bb6826bd81d3542a419d6".into();
        m.save(&path).unwrap();
        assert_eq!(Manifest::load(&path).unwrap(), m);
        assert_eq!(mode(&path), 0o600, "an operator's mode is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mistakes_are_named() {
        check_err(
            "{\"binaries\": [}",
            "invalid JSON at line 1, column 15: expected a value",
        );
        check_err(
            r#"{"binaries":[],"nodes":{}}"#,
            "the top level: unknown key \"nodes\" (known keys: manager, node, binaries, metricsFile)",
        );
        check_err(
            r#"{"node":{}}"#,
            "missing key \"binaries\" (a list, may be empty: \"binaries\": [])",
        );
        check_err(&with_binary(r#""name":"b","pth":"/x/b""#), "binaries[1] (\"b\"): unknown key \"pth\" (known keys: name, version, hash, path, downloadUrl, service, restart, preUpgrade, postUpgrade, confirmSeconds)");
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","confirmSeconds":"5""#),
            "binaries[1] (\"b\"): key \"confirmSeconds\" must be a whole number of seconds from 0 to 600",
        );
        check_err(
            &with_binary(r#""name":"a","path":"/x/b""#),
            "binaries[1]: duplicate name \"a\" (also binaries[0])",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/a""#),
            "binaries[1] (\"b\"): path \"/x/a\" collides with binaries[0] (\"a\")",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/a.bak""#),
            "binaries[1] (\"b\"): path \"/x/a.bak\" collides with binaries[0] (\"a\")",
        );
        check_err(
            &with_binary(r#""name":"b","path":"bin/b""#),
            "binaries[1] (\"b\"): key \"path\" must be an absolute path, not \"bin/b\"",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","hash":"abc""#),
            "binaries[1] (\"b\"): key \"hash\" must be 32 hex digits (an md5) or \"\", not \"abc\"",
        );
        check_err(
            &with_binary(r#""name":"b","path":7"#),
            "binaries[1] (\"b\"): key \"path\" must be a string, not a number",
        );
        check_err(
            &with_binary(r#""path":"/x/b""#),
            "binaries[1]: missing key \"name\"",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","name":"c""#),
            "binaries[1] (\"c\"): key \"name\" appears twice",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","postUpgrade":"/x/b --check 'quick""#),
            "binaries[1] (\"b\"): key \"postUpgrade\" cannot be split into words: \"/x/b --check 'quick\" has an unclosed quote",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","restart":"systemctl \"restart b""#),
            "binaries[1] (\"b\"): key \"restart\" cannot be split into words: \"systemctl \"restart b\" has an unclosed quote",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","preUpgrade":"  ""#),
            "binaries[1] (\"b\"): key \"preUpgrade\" cannot be split into words: \"  \" is empty",
        );
        check_err(
            r#"{"binaries":[],"manager":{"api":"mgr:8081/api/v1"}}"#,
            "\"manager\": key \"api\" \"mgr:8081/api/v1\" must start with http:// or https://",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","downloadUrl":"cdn/b""#),
            "binaries[1] (\"b\"): key \"downloadUrl\" \"cdn/b\" must start with http:// or https://",
        );
        check_err(
            "{\"binaries\": [\n  {\"name\": \"a\", \"path\": \"/x/a\"},\n]}",
            "invalid JSON at line 2, column 32: trailing comma before ']' (JSON allows none)",
        );
        check_err(
            &with_binary(r#""name":"b","path":"/x/b","restart":"signal:HUPP:/run/b.pid""#),
            "binaries[1] (\"b\"): key \"restart\" must be \"signal:NAME:PIDFILE\", e.g. \"signal:HUP:/run/app.pid\": no signal named \"HUPP\"",
        );
        check_err(
            r#"{"binaries":[],"metricsFile":"bp.prom"}"#,
            "the top level: key \"metricsFile\" must be an absolute path",
        );
        check_err(
            r#"{"binaries":{}}"#,
            "\"binaries\" must be a list, not an object",
        );
        check_err(
            r#"{"binaries":[],"manager":{"tokenFile":"t"}}"#,
            "\"manager\": key \"tokenFile\" must be an absolute path",
        );
    }
}
