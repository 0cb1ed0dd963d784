//! What the original project's later agents (qnHackathon's `binproxy.py`
//! and `bin-proxy.sh`, 1.2.0) tell the server, in their own dialect, and how
//! it is kept: per node and binary, the sha256 the node says it runs and its
//! latest progress report. Pure: reading their bodies (bounded, typed),
//! the stored record and its JSON, and what the fleet view shows of it.
//! The requests themselves are answered in `routes/legacy.rs`.
//!
//! Their dialect: SHA-256 instead of md5; `node_id` (query or body) or
//! `nodeName` (body) instead of `?node=`; a registration body of
//! `{cpuArch, osRelease, nodeName, binProxyVersion[, node_id]}`; reports as
//! `{node_id, sha256sum}` or `{nodeName, binName, sha256, version}`; and
//! `POST bins/NAME/progress` with `{nodeName, binName, targetHash,
//! processingTime, status}`.

use crate::json::Value;

/// Longest string accepted in a legacy body (names, OS release, versions).
const MAX_TEXT: usize = 256;
/// An `in_progress` older than this is shown as stale: both agents give up
/// a lock after 600 s, and an agent that crashed mid-upgrade (an exception,
/// a supervisorctl timeout) never sends the final report.
const STALE_AFTER: u64 = 600;

/// What a legacy agent said about one binary on its node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LegacyBin {
    /// The sha256 it last said it runs (a report or a `success`), "" if none.
    pub sha256: String,
    /// Its latest progress report.
    pub progress: Option<Progress>,
}

/// One progress report, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// `in_progress`, `success` or `failed`.
    pub status: Status,
    /// The hash it is moving to, as it sent it (lowercased).
    pub target_hash: String,
    /// The md5 of that build when this server published it, else "".
    pub target_md5: String,
    /// When the server received it, RFC 3339 UTC.
    pub at: String,
    /// Seconds since the agent started on this upgrade, as it said.
    pub processing_time: Option<i64>,
}

/// A progress report's `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Download about to start.
    InProgress,
    /// Installed, restarted and RUNNING.
    Success,
    /// Download, verification or restart failed (it rolled back).
    Failed,
}

impl Status {
    /// The wire word.
    pub fn word(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Success => "success",
            Status::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        [Status::InProgress, Status::Success, Status::Failed]
            .into_iter()
            .find(|st| st.word() == s)
    }
}

/// A legacy registration (`POST keepalive` without our `name`).
#[derive(Debug, PartialEq)]
pub struct Registration {
    /// `node_id`, else `nodeName` ("" when neither).
    pub node: String,
    /// `cpuArch`.
    pub cpu_arch: String,
    /// `osRelease`.
    pub os_release: String,
    /// `binProxyVersion`.
    pub proxy_version: String,
}

/// A legacy report (`POST bins/NAME` with a sha256 instead of our `hash`).
#[derive(Debug, PartialEq)]
pub struct Report {
    /// `node_id`, else `nodeName` ("" when neither).
    pub node: String,
    /// `sha256sum` (the Python agent), else `sha256` (the shell agent), lowercase.
    pub sha256: String,
}

/// A progress report's body.
#[derive(Debug, PartialEq)]
pub struct ProgressBody {
    /// `nodeName`.
    pub node: String,
    /// `targetHash`, lowercase.
    pub target_hash: String,
    /// `status`.
    pub status: Status,
    /// `processingTime`.
    pub processing_time: Option<i64>,
}

/// Whether a `POST keepalive` body is a legacy one: no `name` of ours, and
/// one of their keys.
pub fn is_registration(doc: &Value) -> bool {
    doc.get("name").is_none()
        && ["nodeName", "node_id", "binProxyVersion"]
            .iter()
            .any(|k| doc.get(k).is_some())
}

/// Whether a `POST bins/NAME` body is a legacy report: no `hash` of ours,
/// and a sha256 of theirs.
pub fn is_report(doc: &Value) -> bool {
    doc.get("hash").is_none() && (doc.get("sha256sum").is_some() || doc.get("sha256").is_some())
}

/// Reads a legacy registration; the error names the key.
pub fn registration(doc: &Value) -> Result<Registration, String> {
    Ok(Registration {
        node: node_of(doc)?,
        cpu_arch: text(doc, "cpuArch")?,
        os_release: text(doc, "osRelease")?,
        proxy_version: text(doc, "binProxyVersion")?,
    })
}

/// Reads a legacy report; the error names the key.
pub fn report(doc: &Value) -> Result<Report, String> {
    let key = if doc.get("sha256sum").is_some() {
        "sha256sum"
    } else {
        "sha256"
    };
    let sha256 = text(doc, key)?.to_ascii_lowercase();
    if !is_sha256(&sha256) {
        return Err(format!(
            "\"{key}\" must be a sha256 (64 hex digits), not \"{}\"",
            clip(&sha256)
        ));
    }
    Ok(Report {
        node: node_of(doc)?,
        sha256,
    })
}

/// Reads a progress report; the error names the key and value.
pub fn progress(doc: &Value) -> Result<ProgressBody, String> {
    if !matches!(doc, Value::Obj(_)) {
        return Err(format!(
            "the body must be a JSON object, not {}",
            doc.kind()
        ));
    }
    let node = text(doc, "nodeName")?;
    let target_hash = text(doc, "targetHash")?.to_ascii_lowercase();
    let status = text(doc, "status")?;
    if node.is_empty() || target_hash.is_empty() || status.is_empty() {
        return Err("\"nodeName\", \"targetHash\" and \"status\" are required".into());
    }
    if !is_sha256(&target_hash) && !crate::hash::is_md5(&target_hash) {
        return Err(format!(
            "\"targetHash\" must be a sha256 (64 hex digits) or an md5 (32), not \"{}\"",
            clip(&target_hash)
        ));
    }
    let status = Status::parse(&status).ok_or_else(|| {
        format!(
            "\"status\" must be \"in_progress\", \"success\" or \"failed\", not \"{}\"",
            clip(&status)
        )
    })?;
    let processing_time = match doc.get("processingTime") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            format!(
                "\"processingTime\" must be a whole number of seconds, not {}",
                clip(&v.to_compact())
            )
        })?),
    };
    Ok(ProgressBody {
        node,
        target_hash,
        status,
        processing_time,
    })
}

/// Whether `s` is a sha256 in hex (64 hex digits, either case).
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `node_id`, else `nodeName`: both are the host name in both agents.
fn node_of(doc: &Value) -> Result<String, String> {
    match text(doc, "node_id")? {
        id if id.is_empty() => text(doc, "nodeName"),
        id => Ok(id),
    }
}

/// A string field ("" when absent or null), at most [`MAX_TEXT`] bytes.
fn text(doc: &Value, key: &str) -> Result<String, String> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::Str(s)) if s.len() <= MAX_TEXT => Ok(s.clone()),
        Some(Value::Str(s)) => Err(format!(
            "\"{key}\" is longer than {MAX_TEXT} bytes ({})",
            s.len()
        )),
        Some(o) => Err(format!("\"{key}\" must be a string, not {}", o.kind())),
    }
}

/// A value cut short for an error message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(70) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl LegacyBin {
    /// `{"sha256"?, "progress"?}` as stored in the node's record.
    pub fn to_json(&self) -> Value {
        let mut out = Vec::new();
        if !self.sha256.is_empty() {
            out.push(("sha256", Value::str(&self.sha256)));
        }
        if let Some(p) = &self.progress {
            let mut fields = vec![
                ("status", Value::str(p.status.word())),
                ("targetHash", Value::str(&p.target_hash)),
                ("targetMd5", Value::str(&p.target_md5)),
                ("at", Value::str(&p.at)),
            ];
            if let Some(t) = p.processing_time {
                fields.push(("processingTime", Value::int(t)));
            }
            out.push(("progress", Value::obj(fields)));
        }
        Value::obj(out)
    }

    /// Reads a stored record; a damaged one is an error naming the key.
    pub fn from_json(v: &Value) -> Result<LegacyBin, String> {
        let s = |obj: &Value, k: &str| match obj.get(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::Str(s)) => Ok(s.clone()),
            Some(o) => Err(format!("\"{k}\" must be a string, not {}", o.kind())),
        };
        let progress = match v.get("progress") {
            None | Some(Value::Null) => None,
            Some(p) => Some(Progress {
                status: Status::parse(&s(p, "status")?)
                    .ok_or("\"progress\" has an unknown \"status\"")?,
                target_hash: s(p, "targetHash")?,
                target_md5: s(p, "targetMd5")?,
                at: s(p, "at")?,
                processing_time: p.get("processingTime").and_then(Value::as_i64),
            }),
        };
        Ok(LegacyBin {
            sha256: s(v, "sha256")?,
            progress,
        })
    }
}

/// Whether the node's latest progress for a binary says that an upgrade to
/// `want` (the md5 it should run) failed.
pub fn failed(legacy: Option<&LegacyBin>, want: &str) -> bool {
    legacy
        .and_then(|l| l.progress.as_ref())
        .is_some_and(|p| p.status == Status::Failed && crate::hash::same(&p.target_md5, want))
}

/// What the fleet view adds to one binary's entry of a legacy node: the
/// sha256 it said it runs, its latest progress (`stale` when an
/// `in_progress` is older than [`STALE_AFTER`] at `now`, seconds since the
/// epoch), and for a binary whose `status` is "failed" by its progress, an
/// `error` saying so.
pub fn annotate(
    legacy: Option<&LegacyBin>,
    status: &str,
    now: u64,
    entry: &mut Vec<(&'static str, Value)>,
) {
    let Some(l) = legacy else { return };
    if !l.sha256.is_empty() {
        entry.push(("sha256", Value::str(&l.sha256)));
    }
    let Some(p) = &l.progress else { return };
    let mut fields = vec![
        ("status", Value::str(p.status.word())),
        ("targetHash", Value::str(&p.target_hash)),
        ("at", Value::str(&p.at)),
    ];
    if let Some(t) = p.processing_time {
        fields.push(("processingTime", Value::int(t)));
    }
    let age = crate::log::parse_rfc3339(&p.at).map(|at| now.saturating_sub(at));
    if p.status == Status::InProgress && age.is_some_and(|a| a > STALE_AFTER) {
        fields.push(("stale", Value::Bool(true)));
    }
    entry.push(("progress", Value::obj(fields)));
    if status == "failed" && p.status == Status::Failed && !entry.iter().any(|(k, _)| *k == "error")
    {
        let after = p
            .processing_time
            .map_or(String::new(), |t| format!(" after {t} s"));
        entry.push((
            "error",
            Value::Str(format!(
                "the agent reported the upgrade to {} failed{after}",
                crate::log::short(&p.target_hash)
            )),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn check_progress(body: &str, expected: Result<(&str, Status, Option<i64>), &str>) {
        let got = progress(&parse(body).unwrap());
        match expected {
            Ok((node, status, t)) => {
                let p = got.unwrap_or_else(|e| panic!("{body}: {e}"));
                assert_eq!(
                    (p.node.as_str(), p.status, p.processing_time),
                    (node, status, t)
                );
            }
            Err(msg) => assert_eq!(got.unwrap_err(), msg, "{body}"),
        }
    }

    #[test]
    fn progress_bodies() {
        let ok = |st: &str, t: &str| {
            format!(
                r#"{{"nodeName":"h1","binName":"app","targetHash":"{SHA}","processingTime":{t},"status":"{st}"}}"#
            )
        };
        check_progress(
            &ok("in_progress", "0"),
            Ok(("h1", Status::InProgress, Some(0))),
        );
        check_progress(&ok("success", "12"), Ok(("h1", Status::Success, Some(12))));
        check_progress(&ok("failed", "-3"), Ok(("h1", Status::Failed, Some(-3))));
        check_progress(
            &format!(r#"{{"nodeName":"h1","targetHash":"{SHA}","status":"failed"}}"#),
            Ok(("h1", Status::Failed, None)),
        );
        check_progress(
            &ok("done", "0"),
            Err("\"status\" must be \"in_progress\", \"success\" or \"failed\", not \"done\""),
        );
        check_progress(
            &ok("success", "1.5"),
            Err("\"processingTime\" must be a whole number of seconds, not 1.5"),
        );
        check_progress(
            r#"{"nodeName":"h1","status":"success"}"#,
            Err("\"nodeName\", \"targetHash\" and \"status\" are required"),
        );
        check_progress(
            r#"{"nodeName":"h1","targetHash":"zz","status":"success"}"#,
            Err("\"targetHash\" must be a sha256 (64 hex digits) or an md5 (32), not \"zz\""),
        );
        check_progress(
            &format!(
                r#"{{"nodeName":"{}","targetHash":"{SHA}","status":"failed"}}"#,
                "x".repeat(300)
            ),
            Err("\"nodeName\" is longer than 256 bytes (300)"),
        );
        check_progress("[]", Err("the body must be a JSON object, not an array"));
    }

    #[test]
    fn registrations_and_reports() {
        let py = parse(r#"{"cpuArch": "x86_64", "osRelease": "Debian GNU/Linux 12 (bookworm)", "nodeName": "h1", "binProxyVersion": "1.2.0", "node_id": "h1"}"#).unwrap();
        assert!(is_registration(&py));
        let r = registration(&py).unwrap();
        assert_eq!((r.node.as_str(), r.proxy_version.as_str()), ("h1", "1.2.0"));
        let sh = parse(
            r#"{"cpuArch":"aarch64","osRelease":"x","nodeName":"h2","binProxyVersion":"1.2.0"}"#,
        )
        .unwrap();
        assert_eq!(registration(&sh).unwrap().node, "h2");
        assert!(!is_registration(
            &parse(r#"{"name":"n","nodeName":"h"}"#).unwrap()
        ));
        assert!(!is_registration(&parse(r#"{"cpuArch":"x86_64"}"#).unwrap()));

        let py = parse(&format!(
            r#"{{"node_id": "h1", "sha256sum": "{}"}}"#,
            SHA.to_uppercase()
        ))
        .unwrap();
        assert!(is_report(&py));
        assert_eq!(
            report(&py).unwrap(),
            Report {
                node: "h1".into(),
                sha256: SHA.into()
            }
        );
        let sh = parse(&format!(
            r#"{{"nodeName":"h2","binName":"app","sha256":"{SHA}","version":"latest"}}"#
        ))
        .unwrap();
        assert_eq!(report(&sh).unwrap().node, "h2");
        assert!(!is_report(&parse(r#"{"hash":"x","sha256":"y"}"#).unwrap()));
        assert_eq!(
            report(&parse(r#"{"node_id":"h1","sha256sum":"abc"}"#).unwrap()).unwrap_err(),
            "\"sha256sum\" must be a sha256 (64 hex digits), not \"abc\""
        );
        assert_eq!(
            report(&parse(r#"{"node_id":7,"sha256":"abc"}"#).unwrap()).unwrap_err(),
            "\"sha256\" must be a sha256 (64 hex digits), not \"abc\""
        );
    }

    #[test]
    fn stored_record_round_trips_and_annotates() {
        let rec = LegacyBin {
            sha256: SHA.into(),
            progress: Some(Progress {
                status: Status::Failed,
                target_hash: SHA.into(),
                target_md5: "d41d8cd98f00b204e9800998ecf8427e".into(),
                at: "2026-01-01T00:00:00Z".into(),
                processing_time: Some(4),
            }),
        };
        assert_eq!(LegacyBin::from_json(&rec.to_json()).unwrap(), rec);
        assert!(failed(Some(&rec), "D41D8CD98F00B204E9800998ECF8427E"));
        assert!(!failed(Some(&rec), "00000000000000000000000000000000"));
        assert!(!failed(None, "d41d8cd98f00b204e9800998ecf8427e"));

        let mut entry = Vec::new();
        annotate(Some(&rec), "failed", 0, &mut entry);
        let text = Value::obj(entry).to_compact();
        assert_eq!(
            text,
            format!(
                r#"{{"sha256":"{SHA}","progress":{{"status":"failed","targetHash":"{SHA}","at":"2026-01-01T00:00:00Z","processingTime":4}},"error":"the agent reported the upgrade to 9f86d081… failed after 4 s"}}"#
            )
        );

        // An in_progress older than 600 s is stale; a fresh one is not.
        let mut running = rec.clone();
        let p = running.progress.as_mut().unwrap();
        p.status = Status::InProgress;
        let at = crate::log::parse_rfc3339(&p.at).unwrap();
        for (now, stale) in [(at + STALE_AFTER, false), (at + STALE_AFTER + 1, true)] {
            let mut entry = Vec::new();
            annotate(Some(&running), "behind", now, &mut entry);
            let v = Value::obj(entry);
            let got = v.get("progress").and_then(|p| p.get("stale")).is_some();
            assert_eq!(got, stale, "{}", v.to_compact());
            assert!(v.get("error").is_none());
        }
    }
}
