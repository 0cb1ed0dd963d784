//! A real Prometheus node_exporter (Debian package
//! `prometheus-node-exporter`, installed the way `scripts/setup.sh` does)
//! reading a textfile-collector directory, for tests of the agent's metrics
//! file. Only the textfile collector is on; it listens on a free port of
//! 127.0.0.1 and is stopped (by its pid) when dropped.

use super::{can_run, ensure_debian_packages, http, start_on_free_port};
use std::path::Path;
use std::process::{Child, Command};

const PROGRAM: &str = "/usr/bin/prometheus-node-exporter";

/// A running node_exporter.
pub struct Exporter {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Exporter {
    /// Starts node_exporter on `dir`; `None` (after saying why) when it
    /// cannot be installed here — which fails the test under `CI=true`.
    pub fn start(dir: &Path) -> Option<Exporter> {
        let have = ensure_debian_packages("prometheus-node-exporter", PROGRAM);
        if !can_run(
            have,
            "prometheus-node-exporter is not installed and could not be",
        ) {
            return None;
        }
        let (child, port) = start_on_free_port("prometheus-node-exporter", |port| {
            let mut cmd = Command::new(PROGRAM);
            cmd.arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--collector.disable-defaults")
                .arg("--collector.textfile")
                .arg(format!("--collector.textfile.directory={}", dir.display()));
            cmd
        });
        Some(Exporter {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// `GET /metrics`: the exposition text.
    pub fn scrape(&self) -> String {
        let resp = http("GET", &format!("{}/metrics", self.url), &[], b"");
        assert_eq!(resp.status, 200, "node_exporter /metrics");
        let chunked = resp
            .headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(&resp.body)
        } else {
            resp.body
        };
        String::from_utf8_lossy(&body).into_owned()
    }

    /// The sample line `NAME{LABELS} VALUE` whose name-and-labels part is
    /// `series` (as node_exporter writes it: labels sorted by name).
    pub fn value(&self, text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of a chunked response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
}
