//! The metrics file (`--metrics-file`, `BIN_PROXY_METRICS_FILE`, the
//! manifest's `metricsFile`) read by a real Prometheus node_exporter's
//! textfile collector (testkit/src/exporter.rs), scraped over 127.0.0.1:
//! what an operator's Prometheus would see after an upgrade, an idle run
//! and a failed build, with the counters carried across runs.

use testkit as common;

use common::exporter::Exporter;
use common::host::{install_file, Host, Ran, NODE};
use common::{json_string, md5_hex};
use std::fs;

const OLD: &[u8] = b"#!/bin/sh\necho old\n";
const NEW: &[u8] = b"#!/bin/sh\necho new\n";
const BROKEN: &[u8] = b"#!/bin/sh\necho broken\n";

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn node_exporter_serves_the_agents_metrics_across_runs() {
    let host = Host::new();
    let dir = host.dir.join("textfile");
    fs::create_dir(&dir).unwrap();
    let Some(exporter) = Exporter::start(&dir) else {
        return;
    };
    let prom = dir.join("bin-proxy.prom");
    install_file(&host, "myapp", OLD, 0o755);
    host.manifest_for(&[("myapp", &md5_hex(OLD))]);
    host.server.publish("myapp", NEW);
    let value = |text: &str, series: &str| -> f64 {
        exporter
            .value(text, series)
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
            .parse()
            .unwrap()
    };

    // 1. An upgrade, metrics file named by the flag.
    let before = now();
    let ran = host.run(&["--metrics-file", prom.to_str().unwrap()]);
    ran.expect_code(0).expect_log("upgraded");
    let text = exporter.scrape();
    assert_eq!(value(&text, "node_textfile_scrape_error"), 0.0, "{text}");
    let new = md5_hex(NEW);
    let info = format!("bin_proxy_binary_info{{md5=\"{new}\",name=\"myapp\",state=\"upgraded\"}}");
    assert_eq!(value(&text, &info), 1.0);
    assert_eq!(
        value(&text, "bin_proxy_upgrades_total{name=\"myapp\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "bin_proxy_failures_total{name=\"myapp\"}"),
        0.0
    );
    assert_eq!(value(&text, "bin_proxy_last_run_exit_code"), 0.0);
    let last = value(&text, "bin_proxy_last_run_timestamp_seconds");
    assert!(last >= before.floor() && last <= now() + 1.0, "{last}");
    assert_eq!(
        value(&text, "bin_proxy_last_success_timestamp_seconds"),
        last
    );
    let took = value(&text, "bin_proxy_run_duration_seconds");
    assert!((0.0..60.0).contains(&took), "{took}");
    // The textfile format forbids timestamps; the file is all there is.
    let file = fs::read_to_string(&prom).unwrap();
    for line in file.lines().filter(|l| !l.starts_with('#')) {
        assert_eq!(
            line.split(' ').count(),
            2,
            "a sample with a timestamp? {line:?}"
        );
    }
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["bin-proxy.prom"], "temp files left");

    // 2. Idle, named by the environment: the counter survives the run.
    let ran = Ran::from_command(host.command(&[]).env("BIN_PROXY_METRICS_FILE", &prom));
    ran.expect_code(0);
    let text = exporter.scrape();
    let info =
        format!("bin_proxy_binary_info{{md5=\"{new}\",name=\"myapp\",state=\"up_to_date\"}}");
    assert_eq!(value(&text, &info), 1.0, "{text}");
    assert_eq!(
        value(&text, "bin_proxy_upgrades_total{name=\"myapp\"}"),
        1.0
    );
    let success = value(&text, "bin_proxy_last_success_timestamp_seconds");

    // 3. A build whose health check fails, named by the manifest's metricsFile.
    host.write_manifest(&format!(
        "{{\n  \"node\": {{ \"name\": \"{NODE}\" }},\n  \"metricsFile\": {},\n  \"binaries\": [\n    {{ \"name\": \"myapp\", \"hash\": \"{new}\", \"path\": {}, \"postUpgrade\": \"/bin/sh -c 'exit 1'\" }}\n  ]\n}}\n",
        json_string(prom.to_str().unwrap()),
        json_string(host.target("myapp").to_str().unwrap())
    ));
    host.server.publish("myapp", BROKEN);
    let ran = host.run(&[]);
    ran.expect_code(1).expect_log("rolled back");
    let text = exporter.scrape();
    assert_eq!(value(&text, "node_textfile_scrape_error"), 0.0, "{text}");
    let info = format!("bin_proxy_binary_info{{md5=\"{new}\",name=\"myapp\",state=\"failed\"}}");
    assert_eq!(value(&text, &info), 1.0, "{text}");
    assert_eq!(
        value(&text, "bin_proxy_failures_total{name=\"myapp\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "bin_proxy_rollbacks_total{name=\"myapp\"}"),
        1.0
    );
    assert_eq!(
        value(&text, "bin_proxy_upgrades_total{name=\"myapp\"}"),
        1.0
    );
    assert_eq!(value(&text, "bin_proxy_last_run_exit_code"), 1.0);
    assert_eq!(
        value(&text, "bin_proxy_last_success_timestamp_seconds"),
        success
    );
}
