//! The metrics file: after each run, what happened, in node_exporter's
//! textfile-collector format (Prometheus text exposition, no timestamps),
//! replaced atomically (temp file in the same directory, rename) so that
//! node_exporter never reads half a file. Names follow Prometheus
//! conventions: `bin_proxy_` prefix, base units (seconds), `_total` for
//! counters. The counters live in the agent's state file, so they survive
//! across runs.

use super::state::{Counters, State};
use crate::error::Result;
use crate::fsutil;
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// What one binary ended the run as, for `bin_proxy_binary_info`'s `state`.
pub struct BinaryRow<'a> {
    /// Its name.
    pub name: &'a str,
    /// The md5 recorded as installed ("" when none).
    pub md5: &'a str,
    /// `up_to_date`, `upgraded`, `held_back`, `failed`, `waiting`,
    /// `not_checked`.
    pub state: &'static str,
}

/// The whole run, as the metrics show it.
pub struct RunFacts<'a> {
    /// When the run ended (Unix seconds).
    pub ended: u64,
    /// How long it took.
    pub duration: Duration,
    /// Its exit code.
    pub exit_code: u8,
    /// One row per managed binary the run handled.
    pub binaries: Vec<BinaryRow<'a>>,
}

/// Writes the metrics file for a finished run.
pub fn write(path: &Path, run: &RunFacts<'_>, state: &State) -> Result<()> {
    fsutil::atomic_write(path, render(run, state).as_bytes(), 0o644)
}

/// The file's text.
pub fn render(run: &RunFacts<'_>, state: &State) -> String {
    let mut out = String::new();
    let one = |v: u64| vec![(String::new(), v.to_string())];
    family(
        &mut out,
        "bin_proxy_last_run_timestamp_seconds",
        "gauge",
        "When the last run of the agent ended, in Unix time.",
        &one(run.ended),
    );
    if let Some(t) = state.last_success {
        family(
            &mut out,
            "bin_proxy_last_success_timestamp_seconds",
            "gauge",
            "When a run last ended with nothing failed, in Unix time.",
            &one(t),
        );
    }
    // Milliseconds, written as seconds without float formatting.
    let ms = u64::try_from(run.duration.as_millis()).unwrap_or(u64::MAX);
    family(
        &mut out,
        "bin_proxy_run_duration_seconds",
        "gauge",
        "How long the last run took.",
        &[(String::new(), format!("{}.{:03}", ms / 1000, ms % 1000))],
    );
    family(
        &mut out,
        "bin_proxy_last_run_exit_code",
        "gauge",
        "The last run's exit code: 0 nothing failed, 1 something failed, 2 bad configuration.",
        &one(u64::from(run.exit_code)),
    );
    family(
        &mut out,
        "bin_proxy_server_unreachable_runs_total",
        "counter",
        "Runs that could not reach bin-manager.",
        &one(state.unreachable_runs),
    );
    if let Some(b) = state.backoff(run.ended) {
        family(
            &mut out,
            "bin_proxy_server_backoff_until_seconds",
            "gauge",
            "Until when bin-manager asked this host to leave it alone (429/503 Retry-After), in Unix time; the runs before then ask nothing and do not rewrite this file.",
            &one(b.until),
        );
    }
    let info: Vec<(String, String)> = run
        .binaries
        .iter()
        .map(|b| {
            let labels = format!(
                "{{name=\"{}\",md5=\"{}\",state=\"{}\"}}",
                escape(b.name),
                escape(b.md5),
                b.state
            );
            (labels, "1".to_string())
        })
        .collect();
    family(
        &mut out,
        "bin_proxy_binary_info",
        "gauge",
        "One per managed binary: the md5 installed here and how the last run left it.",
        &info,
    );
    let per_binary = |pick: fn(&Counters) -> u64| -> Vec<(String, String)> {
        run.binaries
            .iter()
            .map(|b| {
                let c = state.counters_of(b.name);
                (
                    format!("{{name=\"{}\"}}", escape(b.name)),
                    pick(&c).to_string(),
                )
            })
            .collect()
    };
    for (name, help, pick) in [
        (
            "bin_proxy_upgrades_total",
            "Builds installed and confirmed running here.",
            (|c| c.upgrades) as fn(&Counters) -> u64,
        ),
        (
            "bin_proxy_failures_total",
            "Builds that did not come up here (rolled back and held back).",
            |c| c.failures,
        ),
        (
            "bin_proxy_rollbacks_total",
            "Backups put back here, after a failure or by `bin-proxy rollback`.",
            |c| c.rollbacks,
        ),
    ] {
        family(&mut out, name, "counter", help, &per_binary(pick));
    }
    out
}

/// One metric family: its HELP and TYPE lines and samples `(labels, value)`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// A label value as the exposition format wants it: `\`, `"` and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::super::state::Count;
    use super::*;

    #[test]
    fn renders_the_textfile_format() {
        let mut state = State::default();
        state.count("app", Count::Upgrade);
        state.count("app", Count::Rollback);
        state.run_ended(true, false, 1_795_507_200);
        let run = RunFacts {
            ended: 1_795_507_201,
            duration: Duration::from_millis(1234),
            exit_code: 0,
            binaries: vec![
                BinaryRow {
                    name: "app",
                    md5: "d41d8cd98f00b204e9800998ecf8427e",
                    state: "upgraded",
                },
                BinaryRow {
                    name: "we\"ird",
                    md5: "",
                    state: "failed",
                },
            ],
        };
        let text = render(&run, &state);
        for line in [
            "# TYPE bin_proxy_last_run_timestamp_seconds gauge",
            "bin_proxy_last_run_timestamp_seconds 1795507201",
            "bin_proxy_last_success_timestamp_seconds 1795507200",
            "bin_proxy_run_duration_seconds 1.234",
            "bin_proxy_last_run_exit_code 0",
            "bin_proxy_binary_info{name=\"app\",md5=\"d41d8cd98f00b204e9800998ecf8427e\",state=\"upgraded\"} 1",
            "bin_proxy_binary_info{name=\"we\\\"ird\",md5=\"\",state=\"failed\"} 1",
            "# TYPE bin_proxy_upgrades_total counter",
            "bin_proxy_upgrades_total{name=\"app\"} 1",
            "bin_proxy_upgrades_total{name=\"we\\\"ird\"} 0",
            "bin_proxy_rollbacks_total{name=\"app\"} 1",
            "bin_proxy_failures_total{name=\"app\"} 0",
            "bin_proxy_server_unreachable_runs_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "lacks {line:?}:\n{text}");
        }
        assert!(text.ends_with('\n'));
        assert!(!text.contains("backoff"), "none asked for: {text}");
        state.set_backoff(1_795_507_202, "503");
        let text = render(&run, &state);
        assert!(
            text.lines()
                .any(|l| l == "bin_proxy_server_backoff_until_seconds 1795507202"),
            "{text}"
        );
        state.set_backoff(1_795_507_201, "503");
        assert!(
            !render(&run, &state).contains("backoff"),
            "over when the run ended"
        );
    }
}
