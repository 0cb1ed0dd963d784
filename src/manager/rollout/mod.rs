//! Staged rollouts: while a new build spreads, which build each node should
//! run, and when the spread moves on, stops or ends. Pure: no I/O and no
//! clock (callers pass `now`, in seconds since the epoch), so every rule is
//! a one-line test.
//!
//! A rollout takes one binary from build `from` (what the fleet runs) to
//! build `to` in phases: the canary nodes first (when there are any), then
//! each step's percentage of the fleet. A node is in a step when its bucket
//! — the first 8 bytes of SHA-256(rollout id ‖ node name), read as a
//! fraction of 2^64 — is below the step's percentage: stable across runs and
//! servers, independent between rollouts. The health gate pauses the rollout
//! by itself when failures reach `maxFailures`, and opens the next step when
//! every node of the current one succeeded or the soak time passed.

use crate::hash::Sha256;
use crate::json::Value;
use crate::log;

mod policy;

use policy::labels_match;
pub use policy::{parse_seconds, Policy, Threshold, Window, DEFAULT_SOAK};

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Spreading, step by step.
    Running,
    /// Stopped by the health gate or an operator: no further node gets the build.
    Paused,
    /// Given up: every node goes back to the previous build.
    Aborted,
    /// The whole fleet gets the new build.
    Done,
}

/// A build, as the rollout names it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BuildRef {
    /// md5, lowercase hex (what agents compare).
    pub md5: String,
    /// sha256, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// One staged rollout of one binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// Stable identifier: the bucket seed.
    pub id: String,
    /// The binary.
    pub name: String,
    /// The arch directory the build was published under, if any.
    pub arch: Option<String>,
    /// The build the fleet ran before.
    pub from: BuildRef,
    /// The build being rolled out.
    pub to: BuildRef,
    /// How it spreads.
    pub policy: Policy,
    /// Where it stands.
    pub state: State,
    /// Current phase: with canaries, phase 0 is the canary phase and phase
    /// `i + 1` is `steps[i]`; without, phase `i` is `steps[i]`.
    pub phase: usize,
    /// When the current phase opened.
    pub phase_started: u64,
    /// When the rollout began.
    pub created: u64,
    /// When it last changed.
    pub updated: u64,
    /// Failures an operator accepted by resuming; the gate counts the rest.
    pub failures_acknowledged: u64,
    /// Why it is in its state (one line), e.g. what paused it.
    pub reason: String,
    /// Bumped by every change: replicas update it only from the revision
    /// they read (a conditional update), so a step advances once.
    pub revision: u64,
    /// A staged publish; `false` for a publish that went to the whole fleet
    /// at once (kept only to know what the fleet runs).
    pub staged: bool,
}

/// Which of the two builds a node should run now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The previous build.
    From,
    /// The new build.
    To,
}

/// What the rollout needs to know about one node.
#[derive(Clone, Debug)]
pub struct NodeView<'a> {
    /// Node name.
    pub name: &'a str,
    /// Its labels.
    pub labels: &'a [(String, String)],
    /// The md5 it last said it runs for this binary ("" when none).
    pub hash: &'a str,
    /// Since when it runs that hash (seconds; 0 unknown).
    pub since: u64,
    /// When it last checked in (seconds).
    pub last_seen: u64,
    /// It reported that the new build failed here.
    pub failed: bool,
}

/// The nodes of a rollout, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes the current phase offers the new build to.
    pub eligible: u64,
    /// Nodes that run the new build.
    pub on_new: u64,
    /// Eligible nodes on the new build for the soak time, still checking in.
    pub succeeded: u64,
    /// Nodes that reported a failure of the new build.
    pub failed: u64,
    /// Eligible nodes neither on the new build nor failed yet.
    pub pending: u64,
}

/// A change the health gate or an operator makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Open the next phase.
    Advance,
    /// Stop offering the build, with the reason.
    Pause(String),
    /// Go on after a pause (its failures are accepted).
    Resume,
    /// Straight to the whole fleet.
    Promote,
    /// Everyone back to the previous build.
    Abort,
    /// The last step passed: the whole fleet is on the new build.
    Finish,
}

/// Why a control action cannot be taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused(pub String);

/// The bucket of `node` in rollout `id`: SHA-256(id ‖ node)'s first 8 bytes.
pub fn bucket(id: &str, node: &str) -> u64 {
    let mut sha = Sha256::new();
    sha.update(id.as_bytes());
    sha.update(node.as_bytes());
    let digest = sha.bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Whether a bucket lies below `percent` % of 2^64.
pub fn within(bucket: u64, percent: u8) -> bool {
    u128::from(bucket) * 100 < u128::from(percent) << 64
}

/// The registry key of a binary's rollout: `NAME`, or `ARCH/NAME` for a
/// build published under an arch directory.
pub fn key(name: &str, arch: Option<&str>) -> String {
    match arch {
        Some(a) => format!("{a}/{name}"),
        None => name.to_string(),
    }
}

/// A rollout id: the binary, its arch and both builds, so that every server
/// derives the same one and a new publish gets fresh buckets.
fn rollout_id(name: &str, arch: Option<&str>, from: &str, to: &str, created: u64) -> String {
    let mut sha = Sha256::new();
    for part in [name, arch.unwrap_or(""), from, to, &created.to_string()] {
        sha.update(part.as_bytes());
        sha.update(b"\0");
    }
    let hex = sha.hex();
    format!("{name}-{}", &hex[..12])
}

impl State {
    /// The word the API uses.
    pub fn word(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Aborted => "aborted",
            State::Done => "done",
        }
    }

    fn from_word(s: &str) -> Option<State> {
        [State::Running, State::Paused, State::Aborted, State::Done]
            .into_iter()
            .find(|st| st.word() == s)
    }
}

impl Rollout {
    /// A rollout that starts now with its first phase open.
    pub fn start(
        name: &str,
        arch: Option<&str>,
        from: BuildRef,
        to: BuildRef,
        policy: Policy,
        now: u64,
    ) -> Rollout {
        Rollout {
            id: rollout_id(name, arch, &from.md5, &to.md5, now),
            name: name.to_string(),
            arch: arch.map(str::to_string),
            from,
            to,
            policy,
            state: State::Running,
            phase: 0,
            phase_started: now,
            created: now,
            updated: now,
            failures_acknowledged: 0,
            reason: "published".into(),
            revision: 1,
            staged: true,
        }
    }

    /// The record of a publish that goes to the whole fleet at once.
    pub fn immediate(
        name: &str,
        arch: Option<&str>,
        from: BuildRef,
        to: BuildRef,
        now: u64,
    ) -> Rollout {
        let mut r = Rollout::start(name, arch, from, to, Policy::whole_fleet(), now);
        r.state = State::Done;
        r.staged = false;
        r.reason = "published to the whole fleet at once".into();
        r
    }

    /// The build the fleet as a whole runs: what a seed agent (which does
    /// not say who it is) gets, and what a new rollout starts from.
    pub fn baseline(&self) -> &BuildRef {
        match self.state {
            State::Done => &self.to,
            State::Running | State::Paused | State::Aborted => &self.from,
        }
    }

    /// Where the registry keeps it: the binary, under its arch directory
    /// when it was published in one (`aarch64/app`).
    pub fn key(&self) -> String {
        key(&self.name, self.arch.as_deref())
    }

    /// Whether the current phase is the canary phase.
    fn in_canary_phase(&self) -> bool {
        self.policy.has_canaries() && self.phase == 0
    }

    /// The percentage of the fleet the current phase offers the build to
    /// (0 in the canary phase; 100 once done).
    pub fn percent(&self) -> u8 {
        match self.state {
            State::Done => 100,
            _ if self.in_canary_phase() => 0,
            _ => {
                let i = self.phase - usize::from(self.policy.has_canaries());
                self.policy.steps.get(i).copied().unwrap_or(100)
            }
        }
    }

    fn is_canary(&self, node: &NodeView) -> bool {
        self.policy.canary.iter().any(|c| c == node.name)
            || (!self.policy.canary_labels.is_empty()
                && labels_match(node.labels, &self.policy.canary_labels))
    }

    /// Whether the current phase offers the build to this node (ignoring
    /// the state and the window).
    pub fn offered(&self, node: &NodeView) -> bool {
        labels_match(node.labels, &self.policy.selector)
            && (self.is_canary(node) || within(bucket(&self.id, node.name), self.percent()))
    }

    /// Which build `node` should run now.
    pub fn choose(&self, node: &NodeView, now: u64) -> Choice {
        let on_new = crate::hash::same(node.hash, &self.to.md5);
        match self.state {
            State::Done => return Choice::To,
            State::Aborted => return Choice::From,
            State::Running | State::Paused => {}
        }
        if !labels_match(node.labels, &self.policy.selector) || node.failed {
            return Choice::From;
        }
        if on_new {
            return Choice::To; // it keeps what it runs, paused or not
        }
        if self.state == State::Paused || self.policy.window.is_some_and(|w| !w.contains(now)) {
            return Choice::From;
        }
        if self.offered(node) {
            Choice::To
        } else {
            Choice::From
        }
    }

    /// Counts `nodes` (those that manage this binary) against the current phase.
    pub fn count<'a>(&self, nodes: impl IntoIterator<Item = NodeView<'a>>, now: u64) -> Counts {
        let mut c = Counts::default();
        for node in nodes {
            let on_new = !node.failed && crate::hash::same(node.hash, &self.to.md5);
            let eligible = self.offered(&node);
            c.on_new += u64::from(on_new);
            c.failed += u64::from(node.failed);
            if !eligible {
                continue;
            }
            c.eligible += 1;
            let soaked = node.since > 0
                && now >= node.since.saturating_add(self.policy.soak_seconds)
                && node.last_seen >= node.since.saturating_add(self.policy.soak_seconds);
            c.succeeded += u64::from(on_new && soaked);
            c.pending += u64::from(!on_new && !node.failed);
        }
        c
    }

    /// What the health gate does now, given the counts: pause when the
    /// failures reach the threshold, open the next phase when every node of
    /// this one succeeded (at least one) or its soak time passed, finish
    /// after the last.
    pub fn gate(&self, c: &Counts, now: u64) -> Option<Transition> {
        if self.state != State::Running {
            return None;
        }
        let failures = c.failed.saturating_sub(self.failures_acknowledged);
        let tried = c.on_new + c.failed;
        let reached = match self.policy.max_failures {
            Threshold::Count(n) => failures >= n,
            Threshold::Percent(p) => failures >= 1 && failures * 100 >= u64::from(p) * tried,
        };
        if reached {
            return Some(Transition::Pause(format!(
                "{failures} {} failed with {} ({} tried; maxFailures {})",
                if failures == 1 { "node" } else { "nodes" },
                log::short(&self.to.md5),
                tried,
                self.policy.max_failures.text()
            )));
        }
        let all_good = c.eligible > 0 && c.succeeded == c.eligible;
        let soaked = now >= self.phase_started.saturating_add(self.policy.soak_seconds);
        if !(all_good || soaked) {
            return None;
        }
        Some(if self.phase + 1 >= self.policy.phases() {
            Transition::Finish
        } else {
            Transition::Advance
        })
    }

    /// Applies a transition, or says why it cannot be taken in this state.
    pub fn apply(&mut self, t: &Transition, failed_now: u64, now: u64) -> Result<(), Refused> {
        let refuse = |what: &str, st: State| {
            Err(Refused(format!(
                "cannot {what} a rollout that is {}",
                st.word()
            )))
        };
        match (t, self.state) {
            (Transition::Advance, State::Running) => {
                self.phase += 1;
                self.phase_started = now;
                self.reason = format!("step {}% opened", self.percent());
            }
            (Transition::Finish, State::Running)
            | (Transition::Promote, State::Running | State::Paused) => {
                self.state = State::Done;
                self.reason = if *t == Transition::Promote {
                    "promoted to the whole fleet".into()
                } else {
                    "every step passed".into()
                };
            }
            (Transition::Pause(why), State::Running) => {
                self.state = State::Paused;
                self.reason = why.clone();
            }
            (Transition::Resume, State::Paused) => {
                self.state = State::Running;
                self.failures_acknowledged = failed_now;
                self.phase_started = now;
                self.reason = "resumed".into();
            }
            (Transition::Abort, State::Running | State::Paused) => {
                self.state = State::Aborted;
                self.reason = "aborted: every node goes back to the previous build".into();
            }
            (Transition::Advance | Transition::Finish, st) => return refuse("advance", st),
            (Transition::Pause(_), st) => return refuse("pause", st),
            (Transition::Resume, st) => return refuse("resume", st),
            (Transition::Promote, st) => return refuse("promote", st),
            (Transition::Abort, st) => return refuse("abort", st),
        }
        self.updated = now;
        self.revision += 1;
        Ok(())
    }

    /// The rollout as JSON (the API's answer and the stored record).
    pub fn to_json(&self) -> Value {
        let build = |b: &BuildRef| {
            Value::obj([
                ("hash", Value::str(&b.md5)),
                ("sha256", Value::str(&b.sha256)),
                ("size", Value::int(b.size)),
            ])
        };
        let labels =
            |l: &[(String, String)]| Value::obj(l.iter().map(|(k, v)| (k.clone(), Value::str(v))));
        let time = |t: u64| {
            Value::str(log::rfc3339(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t),
            ))
        };
        let p = &self.policy;
        Value::obj([
            ("id", Value::str(&self.id)),
            ("binary", Value::str(&self.name)),
            ("arch", self.arch.as_deref().map_or(Value::Null, Value::str)),
            ("from", build(&self.from)),
            ("to", build(&self.to)),
            ("state", Value::str(self.state.word())),
            ("percent", Value::int(self.percent())),
            ("phase", Value::int(self.phase as u64)),
            (
                "canaryPhase",
                Value::Bool(self.in_canary_phase() && self.state != State::Done),
            ),
            (
                "steps",
                Value::Arr(p.steps.iter().map(|s| Value::int(*s)).collect()),
            ),
            ("soakSeconds", Value::int(p.soak_seconds)),
            ("maxFailures", Value::str(p.max_failures.text())),
            (
                "canary",
                Value::Arr(p.canary.iter().map(Value::str).collect()),
            ),
            ("canaryLabels", labels(&p.canary_labels)),
            ("match", labels(&p.selector)),
            (
                "window",
                p.window.map_or(Value::Null, |w| Value::str(w.text())),
            ),
            ("phaseStarted", time(self.phase_started)),
            ("created", time(self.created)),
            ("updated", time(self.updated)),
            (
                "failuresAcknowledged",
                Value::int(self.failures_acknowledged),
            ),
            ("reason", Value::str(&self.reason)),
            ("revision", Value::int(self.revision)),
            ("staged", Value::Bool(self.staged)),
        ])
    }

    /// Reads a stored rollout (what [`Rollout::to_json`] wrote).
    pub fn from_json(v: &Value) -> Result<Rollout, String> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(format!("rollout: \"{k}\" missing"))
        };
        let n = |k: &str| {
            v.get(k)
                .and_then(Value::as_u64)
                .ok_or(format!("rollout: \"{k}\" missing"))
        };
        let t =
            |k: &str| log::parse_rfc3339(&s(k)?).ok_or(format!("rollout: \"{k}\" is not a time"));
        let build = |k: &str| -> Result<BuildRef, String> {
            let b = v.get(k).ok_or(format!("rollout: \"{k}\" missing"))?;
            Ok(BuildRef {
                md5: b
                    .get("hash")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                sha256: b
                    .get("sha256")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                size: b.get("size").and_then(Value::as_u64).unwrap_or(0),
            })
        };
        let mut policy = Policy::from_json(&Value::obj(
            [
                "steps",
                "soakSeconds",
                "maxFailures",
                "canary",
                "canaryLabels",
                "match",
                "window",
            ]
            .into_iter()
            .filter_map(|k| {
                v.get(k)
                    .filter(|x| !matches!(x, Value::Null))
                    .map(|x| (k, x.clone()))
            }),
        ))?;
        policy.canary_labels.sort();
        policy.selector.sort();
        Ok(Rollout {
            id: s("id")?,
            name: s("binary")?,
            arch: v.get("arch").and_then(Value::as_str).map(str::to_string),
            from: build("from")?,
            to: build("to")?,
            policy,
            state: State::from_word(&s("state")?).ok_or("rollout: unknown \"state\"")?,
            phase: n("phase")? as usize,
            phase_started: t("phaseStarted")?,
            created: t("created")?,
            updated: t("updated")?,
            failures_acknowledged: n("failuresAcknowledged")?,
            reason: s("reason")?,
            revision: n("revision")?,
            staged: !matches!(v.get("staged"), Some(Value::Bool(false))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_507_200; // 2026-11-24T08:00:00Z, a Tuesday

    fn build(c: char) -> BuildRef {
        BuildRef {
            md5: c.to_string().repeat(32),
            sha256: c.to_string().repeat(64),
            size: 10,
        }
    }

    fn policy(q: &str) -> Policy {
        let pairs: Vec<(String, String)> = q
            .split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        Policy::from_query(&pairs).unwrap().unwrap()
    }

    fn rollout(q: &str) -> Rollout {
        Rollout::start("app", None, build('a'), build('b'), policy(q), T0)
    }

    fn node<'a>(name: &'a str, hash: &'a str) -> NodeView<'a> {
        NodeView {
            name,
            labels: &[],
            hash,
            since: 0,
            last_seen: 0,
            failed: false,
        }
    }

    #[test]
    fn buckets_are_stable_uniform_and_independent() {
        assert_eq!(bucket("r1", "web-01"), bucket("r1", "web-01"));
        // The definition, spelled out: SHA-256("r1" ‖ "web-01"), first 8 bytes, big-endian.
        let mut sha = Sha256::new();
        sha.update(b"r1web-01");
        let d = sha.bytes();
        assert_eq!(
            bucket("r1", "web-01"),
            u64::from_be_bytes(d[..8].try_into().unwrap())
        );
        let names: Vec<String> = (0..100_000).map(|i| format!("node-{i}")).collect();
        for pct in [1u8, 10, 50, 90] {
            let n = names
                .iter()
                .filter(|n| within(bucket("r1", n), pct))
                .count() as f64;
            let want = 1000.0 * f64::from(pct);
            assert!(
                (n - want).abs() < want * 0.05 + 100.0,
                "{pct}%: {n} of 100000"
            );
        }
        let in_a: Vec<bool> = names.iter().map(|n| within(bucket("r1", n), 10)).collect();
        let both = names
            .iter()
            .zip(&in_a)
            .filter(|(n, a)| **a && within(bucket("r2", n), 10))
            .count();
        assert!(
            (both as f64 - 1000.0).abs() < 200.0,
            "rollouts overlap by {both} (independent: ~1000)"
        );
        assert!(within(0, 1) && !within(u64::MAX, 100 - 1) && within(u64::MAX, 100));
        assert!(!within(u64::MAX / 100 + 1, 1) && within(u64::MAX / 100 - 1, 1));
    }

    #[test]
    fn who_gets_what() {
        let mut r = rollout("rollout=10,100&canary=c1");
        let c1 = node("c1", "");
        // Nodes in the 10% bucket and outside it, found by the bucket function itself.
        let inside = (0..)
            .map(|i| format!("n{i}"))
            .find(|n| within(bucket(&r.id, n), 10))
            .unwrap();
        let outside = (0..)
            .map(|i| format!("n{i}"))
            .find(|n| !within(bucket(&r.id, n), 10))
            .unwrap();
        let (inside, outside) = (node(&inside, ""), node(&outside, ""));
        assert_eq!(
            (r.choose(&c1, T0), r.choose(&inside, T0)),
            (Choice::To, Choice::From),
            "canary phase first"
        );
        r.apply(&Transition::Advance, 0, T0).unwrap();
        assert_eq!(r.percent(), 10);
        assert_eq!(
            (
                r.choose(&c1, T0),
                r.choose(&inside, T0),
                r.choose(&outside, T0)
            ),
            (Choice::To, Choice::To, Choice::From)
        );
        r.apply(&Transition::Pause("x".into()), 0, T0).unwrap();
        let on_new = node(inside.name, "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
        assert_eq!(
            (r.choose(&inside, T0), r.choose(&on_new, T0)),
            (Choice::From, Choice::To),
            "paused: no further node, the installed keep it"
        );
        let failed = NodeView {
            failed: true,
            ..on_new.clone()
        };
        assert_eq!(r.choose(&failed, T0), Choice::From);
        r.apply(&Transition::Abort, 0, T0).unwrap();
        assert_eq!(
            r.choose(&on_new, T0),
            Choice::From,
            "abort sends everyone back"
        );
        let mut done = rollout("rollout=10,100");
        done.apply(&Transition::Promote, 0, T0).unwrap();
        assert_eq!(
            (done.choose(&outside, T0), done.percent()),
            (Choice::To, 100)
        );
    }

    #[test]
    fn labels_and_windows_restrict_who_switches() {
        let r = rollout("rollout=100&match=region=eu&canaryLabel=group=edge&window=tue@09-10");
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        let eu = [pair("region", "eu")];
        let us = [pair("region", "us")];
        let edge = [pair("group", "edge"), pair("region", "eu")];
        fn n(labels: &[(String, String)]) -> NodeView<'_> {
            NodeView {
                labels,
                ..node("x", "")
            }
        }
        let (eu, us, edge) = (&eu[..], &us[..], &edge[..]);
        let in_window = T0 + 3600; // Tuesday 09:00
        assert_eq!(r.choose(&n(edge), in_window), Choice::To, "label canary");
        assert_eq!(
            r.choose(&n(eu), in_window),
            Choice::From,
            "canary phase: 0%"
        );
        assert_eq!(
            r.choose(&n(edge), T0),
            Choice::From,
            "outside the window it keeps its build"
        );
        let mut r = r;
        r.apply(&Transition::Advance, 0, T0).unwrap();
        assert_eq!(
            (r.choose(&n(eu), in_window), r.choose(&n(us), in_window)),
            (Choice::To, Choice::From)
        );
        let on_new = NodeView {
            hash: "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            ..n(eu)
        };
        assert_eq!(
            r.choose(&on_new, T0),
            Choice::To,
            "outside the window a switched node keeps the new build"
        );
    }

    #[test]
    fn the_gate_pauses_advances_and_finishes() {
        let mut r = rollout("rollout=10,100&soak=60&maxFailures=2");
        let c = |eligible, on_new, succeeded, failed| Counts {
            eligible,
            on_new,
            succeeded,
            failed,
            pending: 0,
        };
        assert_eq!(
            r.gate(&c(3, 1, 0, 1), T0 + 10),
            None,
            "one failure, one soaking"
        );
        assert_eq!(
            r.gate(&c(3, 3, 3, 0), T0 + 10),
            Some(Transition::Advance),
            "every node succeeded"
        );
        assert_eq!(
            r.gate(&c(0, 0, 0, 0), T0 + 10),
            None,
            "an empty step waits for its soak time"
        );
        assert_eq!(
            r.gate(&c(3, 1, 0, 1), T0 + 60),
            Some(Transition::Advance),
            "soak passed below the threshold"
        );
        let pause = r.gate(&c(3, 1, 0, 2), T0 + 10).unwrap();
        assert_eq!(
            pause,
            Transition::Pause("2 nodes failed with bbbbbbbb… (3 tried; maxFailures 2)".into())
        );
        r.apply(&Transition::Advance, 0, T0 + 60).unwrap();
        assert_eq!(r.gate(&c(50, 50, 50, 0), T0 + 61), Some(Transition::Finish));
        r.apply(&pause, 2, T0 + 61).unwrap();
        assert_eq!(
            (r.state, r.gate(&c(50, 50, 50, 2), T0 + 500)),
            (State::Paused, None)
        );
        r.apply(&Transition::Resume, 2, T0 + 600).unwrap();
        assert_eq!(
            r.gate(&c(50, 48, 0, 3), T0 + 601),
            None,
            "resuming accepts the failures so far"
        );
        assert!(matches!(
            r.gate(&c(50, 48, 0, 4), T0 + 601),
            Some(Transition::Pause(_))
        ));
        let mut pct = rollout("rollout=100&maxFailures=50%");
        assert!(
            matches!(pct.gate(&c(4, 1, 0, 1), T0), Some(Transition::Pause(_))),
            "1 of 2 tried is 50%"
        );
        assert_eq!(
            pct.gate(&c(4, 2, 0, 1), T0),
            None,
            "1 of 3 tried is below 50%"
        );
        pct.apply(&Transition::Finish, 0, T0).unwrap();
        assert_eq!(pct.gate(&c(4, 2, 0, 3), T0), None, "done is final");
    }

    #[test]
    fn counts_follow_the_phase_and_the_soak() {
        let mut r = rollout("rollout=50,100&soak=60");
        let names: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
        let b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let views = |now_new: &dyn Fn(&str) -> bool| -> Vec<NodeView> {
            names
                .iter()
                .map(|n| NodeView {
                    hash: if now_new(n) { b } else { "" },
                    since: T0,
                    last_seen: T0 + 100,
                    ..node(n, "")
                })
                .collect()
        };
        let c = r.count(views(&|_| false), T0 + 100);
        assert!(c.eligible > 70 && c.eligible < 130, "{c:?}");
        assert_eq!((c.on_new, c.succeeded, c.pending), (0, 0, c.eligible));
        let offered = |n: &str| within(bucket(&r.id, n), 50);
        let c = r.count(views(&offered), T0 + 100);
        assert_eq!(
            (c.on_new, c.succeeded, c.pending),
            (c.eligible, c.eligible, 0)
        );
        assert_eq!(r.gate(&c, T0 + 1), Some(Transition::Advance));
        let c = r.count(views(&offered), T0 + 30);
        assert_eq!(c.succeeded, 0, "not soaked yet");
        r.apply(&Transition::Abort, 0, T0).unwrap();
        assert!(r.apply(&Transition::Resume, 0, T0).is_err());
        assert_eq!(
            r.apply(&Transition::Promote, 0, T0).unwrap_err().0,
            "cannot promote a rollout that is aborted"
        );
    }

    #[test]
    fn a_stored_rollout_reads_back_the_same() {
        let mut r = Rollout::start("app", Some("aarch64"), build('a'), build('b'), policy("rollout=1,10,100&soak=90&maxFailures=3%&canary=n1&canaryLabel=g=c&match=dc=fra1&window=sat,sun@22-04"), T0);
        r.apply(&Transition::Advance, 0, T0 + 5).unwrap();
        r.apply(&Transition::Pause("2 nodes failed".into()), 0, T0 + 6)
            .unwrap();
        let text = r.to_json().to_compact();
        let back = Rollout::from_json(&crate::json::parse(&text).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            (back.state, back.percent(), back.revision),
            (State::Paused, 1, 3)
        );
        assert!(Rollout::from_json(&crate::json::parse("{}").unwrap()).is_err());
    }
}
