use testkit as common;

// Back-off the server can steer, as an operator sees it: the real
// `bin-proxy` against the recording fake bin-manager (a `Busy` fault: 429 or
// 503 with or without Retry-After) and against a real bin-manager shedding
// load (`maxRequestsPerSecond`). What is checked: the exit code, the log
// line, the time kept in the state file, the requests the server received
// (none while the back-off lasts), and the files left alone.

use common::host::{assert_unchanged, install_file, log_line, snapshot, Host, Ran};
use common::json::parse;
use common::manager::Manager;
use common::{http, md5_hex, wait_until, Fault};
use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const OLD: &[u8] = b"#!/bin/sh\necho old build\n";
const NEW: &[u8] = b"#!/bin/sh\necho new build, much better\n";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A host managing `a` and `b` (both `OLD`, recorded), with `NEW` published
/// for both.
fn outdated_pair() -> Host {
    let host = Host::new();
    for name in ["a", "b"] {
        install_file(&host, name, OLD, 0o755);
        host.server.publish(name, NEW);
    }
    host.manifest_for(&[("a", &md5_hex(OLD)), ("b", &md5_hex(OLD))]);
    host
}

/// The state file's `serverBackoff.until` (Unix seconds), if it has one.
fn backoff_until(host: &Host) -> Option<u64> {
    let mut path = host.manifest.clone().into_os_string();
    path.push(".state");
    let text = fs::read_to_string(path).ok()?;
    let b = parse(&text).opt("serverBackoff")?.get("until").n();
    Some(b as u64)
}

/// Runs the agent, noting the clock around it (whole seconds).
fn timed_run(host: &Host, args: &[&str]) -> (u64, Ran, u64) {
    let before = now();
    let ran = host.run(args);
    (before, ran, now())
}

#[test]
fn a_503_with_retry_after_stops_the_run_and_the_next_runs_ask_nothing_until_it_passes() {
    let host = outdated_pair();
    host.server
        .fault("a", Fault::Busy(503, Some("2".to_string())));
    let before = snapshot(&host);

    let (t0, ran, t1) = timed_run(&host, &[]);
    ran.expect_code(1);
    let line = log_line(&ran, &["ERROR", "server asks to retry after 2 s"]);
    assert!(
        line.contains("(503 from ")
            && line.contains("/api/v1/bins/a")
            && line.contains("server busy")
            && line.contains("next attempt not before 20")
            && line.contains("2 binaries not checked, nothing changed"),
        "{line}"
    );
    ran.expect_log("2 not checked (the server asked to back off)");
    // No build blamed: nothing failed, nothing held back.
    ran.expect_log("0 failed, 0 held back");
    assert!(!ran.stderr.contains("held back ("), "{}", ran.stderr);
    // The run stopped asking at the 503: `b` was not asked about, nothing
    // downloaded, no inventory posted.
    assert_eq!(host.server.count("GET", "/api/v1/bins/a"), 1);
    assert_eq!(host.server.count("GET", "/api/v1/bins/b"), 0);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
    assert_eq!(host.server.count("POST", "/api/v1/bins"), 0);
    // The registration came before it; no inventory after it.
    assert_eq!(host.server.count("POST", "/api/v1/keepalive"), 1);
    assert_unchanged(&host, &before, &ran);
    // Retry-After 2 plus up to 1 s of jitter.
    let until = backoff_until(&host).expect("the back-off is in the state file");
    assert!(until >= t0 + 2 && until <= t1 + 3, "{t0} {until} {t1}");

    // The next cron run, at once: no request at all, exit 0, one info line.
    host.server.clear_requests();
    let ran = host.run(&[]);
    ran.expect_code(0);
    assert_eq!(ran.stderr.lines().count(), 1, "{}", ran.stderr);
    let line = log_line(&ran, &["INFO", "server asked to be left alone until 20"]);
    assert!(
        line.contains("503 from ") && line.contains("not asking before then"),
        "{line}"
    );
    assert!(
        host.server.requests().is_empty(),
        "{:?}",
        host.server.requests()
    );
    // Quiet cron runs print nothing at all.
    let ran = host.run(&["--quiet"]);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "");
    assert!(host.server.requests().is_empty());
    // `status` shows it (and, asked by an operator, still asks the server).
    let ran = host.run(&["status"]);
    ran.expect_log("the server asked to be left alone until 20");
    assert_eq!(backoff_until(&host), Some(until), "status changes nothing");

    // Once the time has passed, a run asks again and gets on with it.
    host.server.fault("a", Fault::None);
    assert!(
        wait_until(Duration::from_secs(10), || now() >= until),
        "the clock reaches the back-off's end"
    );
    host.server.clear_requests();
    let ran = host.run(&[]);
    ran.expect_code(0);
    ran.expect_log("2 binaries: 0 up to date, 2 changed, 0 failed");
    assert_eq!(fs::read(host.target("a")).unwrap(), NEW);
    assert_eq!(fs::read(host.target("b")).unwrap(), NEW);
    assert_eq!(
        backoff_until(&host),
        None,
        "a back-off that passed is forgotten"
    );
}

#[test]
fn an_http_date_retry_after_is_honoured_and_now_overrides_it() {
    let host = outdated_pair();
    // Two minutes ahead, as an IMF-fixdate.
    let target = now() + 120;
    let date = {
        let out = std::process::Command::new("date")
            .args([
                "-u",
                "-d",
                &format!("@{target}"),
                "+%a, %d %b %Y %H:%M:%S GMT",
            ])
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    host.server.fault("b", Fault::Busy(503, Some(date.clone())));

    let (t0, ran, t1) = timed_run(&host, &[]);
    ran.expect_code(1);
    let line = log_line(&ran, &["server asks to retry after"]);
    let secs: u64 = line
        .split("retry after ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        (target - t1..=target - t0).contains(&secs),
        "Retry-After {date:?} read as {secs} s: {line}"
    );
    assert!(line.contains("1 binary not checked"), "{line}");
    // `a` came first and was upgraded; `b` is left for later.
    assert_eq!(fs::read(host.target("a")).unwrap(), NEW);
    assert_eq!(fs::read(host.target("b")).unwrap(), OLD);
    // That date, plus up to half the delay of jitter.
    let until = backoff_until(&host).unwrap();
    assert!(
        until >= target && until <= target + 60,
        "{date}: {target} {until}"
    );

    // The operator's override asks at once and clears the back-off.
    host.server.fault("b", Fault::None);
    host.server.clear_requests();
    let ran = host.run(&["--now"]);
    ran.expect_code(0);
    ran.expect_log("--now: asking the server although it asked to be left alone until");
    assert_eq!(fs::read(host.target("b")).unwrap(), NEW);
    assert_eq!(host.server.count("GET", "/api/v1/bins/b"), 1);
    assert_eq!(backoff_until(&host), None);
}

#[test]
fn a_retry_after_of_ten_days_is_capped_at_one_day() {
    let host = outdated_pair();
    host.server
        .fault("a", Fault::Busy(503, Some((10 * 86_400).to_string())));
    let metrics = host.dir.join("bin-proxy.prom");
    let (t0, ran, t1) = timed_run(&host, &["--metrics-file", metrics.to_str().unwrap()]);
    ran.expect_code(1);
    ran.expect_log("server asks to retry after 864000 s");
    let until = backoff_until(&host).unwrap();
    assert!(
        until >= t0 + 86_400 && until <= t1 + 86_400,
        "at most a day: {t0} {until} {t1}"
    );
    // The metrics file says so too (for an alert that tells a quiet agent
    // from one that was asked to be quiet).
    let text = fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains(&format!(
            "\nbin_proxy_server_backoff_until_seconds {until}\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("\nbin_proxy_last_run_exit_code 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nbin_proxy_server_unreachable_runs_total 0\n"),
        "it answered: not an unreachable run\n{text}"
    );
}

#[test]
fn a_429_without_retry_after_backs_off_one_to_five_minutes() {
    let host = outdated_pair();
    host.server.fault("a", Fault::Busy(429, None));
    let (t0, ran, t1) = timed_run(&host, &[]);
    ran.expect_code(1);
    let line = log_line(&ran, &["server is overloaded (no Retry-After)"]);
    assert!(line.contains("(429 from "), "{line}");
    let until = backoff_until(&host).unwrap();
    assert!(until >= t0 + 60 && until <= t1 + 300, "{t0} {until} {t1}");
    assert_eq!(host.server.count("GET", "/api/v1/bins/b"), 0);
}

#[test]
fn a_429_on_a_report_keeps_the_upgrade_and_asks_nothing_more() {
    let host = outdated_pair();
    // The report about `b`, the last binary, is answered 429 (no
    // Retry-After); its lookup and download were served.
    host.server.fault("b", Fault::ReportStatus(429));
    let ran = host.run(&[]);
    ran.expect_code(1);
    assert_eq!(fs::read(host.target("a")).unwrap(), NEW);
    assert_eq!(fs::read(host.target("b")).unwrap(), NEW, "kept: it works");
    log_line(
        &ran,
        &[
            "server is overloaded (no Retry-After)",
            "429 from ",
            "bins/b",
        ],
    );
    // Only the registration before it: no inventory after it.
    assert_eq!(host.server.count("POST", "/api/v1/keepalive"), 1);
    assert!(backoff_until(&host).is_some());

    // The same for `a`'s report, with `b` still to do: `b` is not asked.
    host.server.fault("b", Fault::None);
    host.server.fault("a", Fault::ReportStatus(429));
    for name in ["a", "b"] {
        host.server.publish(name, OLD);
    }
    host.server.clear_requests();
    let ran = host.run(&["--now"]);
    ran.expect_code(1);
    assert_eq!(
        fs::read(host.target("a")).unwrap(),
        OLD,
        "a upgraded (to OLD)"
    );
    assert_eq!(fs::read(host.target("b")).unwrap(), NEW, "b left for later");
    log_line(&ran, &["429 from ", "bins/a", "1 binary not checked"]);
    assert_eq!(
        host.server.count("GET", "/api/v1/bins/b"),
        0,
        "asked nothing more"
    );
    assert_eq!(host.server.count("POST", "/api/v1/keepalive"), 0);
}

#[test]
fn a_download_told_to_retry_shortly_waits_and_retries_within_the_run() {
    let host = outdated_pair();
    host.manifest_for(&[("a", &md5_hex(OLD))]);
    host.server
        .fault("a", Fault::DownloadBusy(Some("1".to_string()), 1));
    let ran = host.run(&[]);
    ran.expect_code(0);
    let line = log_line(
        &ran,
        &[
            "download attempt 1 of 3 failed",
            "asks to retry after 1 s",
            "retrying in",
        ],
    );
    // At least the server's second (jitter alone would be 0..1 s).
    let ms: u64 = line
        .rsplit("retrying in ")
        .next()
        .and_then(|r| r.strip_suffix(" ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!((1000..=2000).contains(&ms), "{line}");
    assert_eq!(host.server.count("GET", "/api/v1/download/a"), 2);
    assert_eq!(fs::read(host.target("a")).unwrap(), NEW);
    assert_eq!(backoff_until(&host), None);
}

#[test]
fn a_download_told_to_retry_much_later_ends_the_run() {
    let host = outdated_pair();
    host.server
        .fault("a", Fault::DownloadBusy(Some("600".to_string()), 99));
    let before = snapshot(&host);
    let (t0, ran, t1) = timed_run(&host, &[]);
    ran.expect_code(1);
    log_line(&ran, &["server asks to retry after 600 s", "download/a"]);
    assert_eq!(
        host.server.count("GET", "/api/v1/download/a"),
        1,
        "not retried"
    );
    assert_eq!(host.server.count("GET", "/api/v1/bins/b"), 0);
    assert_unchanged(&host, &before, &ran);
    let until = backoff_until(&host).unwrap();
    assert!(until >= t0 + 600 && until <= t1 + 900, "{t0} {until} {t1}");
}

/// The real server shedding load: its 503 + Retry-After reaches the agent's
/// first request, and the next run asks it nothing.
#[test]
fn a_real_bin_manager_over_max_requests_per_second_is_left_alone() {
    let m = Manager::start_with_config(r#"{"maxRequestsPerSecond":1}"#, &[]);
    m.publish_mv("a", NEW);
    let host = Host::new();
    install_file(&host, "a", OLD, 0o755);
    host.manifest_for(&[("a", &md5_hex(OLD))]);
    let agent = |args: &[&str]| {
        let mut cmd = host.command(args);
        cmd.env("BIN_MANAGER_API", m.api());
        Ran::from_command(&mut cmd)
    };
    // Another client takes the second's only request.
    let r = http(
        "GET",
        &format!("{}/keepalive?node=other", m.api()),
        &[],
        b"",
    );
    assert_ne!(r.status, 503);

    let t0 = now();
    let ran = agent(&[]);
    let t1 = now();
    ran.expect_code(1);
    let line = log_line(&ran, &["server asks to retry after 1 s", "503 from "]);
    assert!(
        line.contains("overloaded") && line.contains("/api/v1/check"),
        "{line}"
    );
    let until = backoff_until(&host).unwrap();
    assert!(until > t0 && until <= t1 + 2, "{t0} {until} {t1}");
    assert_eq!(fs::read(host.target("a")).unwrap(), OLD);

    let ran = agent(&[]);
    ran.expect_code(0);
    ran.expect_log("server asked to be left alone until");
    // The access log is in order: once a later marker request is in it,
    // every request of the agent's would be too. Only its first one is.
    http(
        "GET",
        &format!("{}/keepalive?node=marker", m.api()),
        &[],
        b"",
    );
    assert!(
        m.wait_log(Duration::from_secs(5), |l| l.contains("node=marker"))
            .is_some(),
        "the marker request is logged"
    );
    let asked = m
        .log_lines()
        .iter()
        .filter(|l| l.contains("node=test-node") || l.contains("POST /api/v1/check"))
        .count();
    assert_eq!(asked, 1, "{:#?}", m.log_lines());
}

/// bin-manager's per-client share (`maxRequestsPerClientPerSecond`): the
/// agent over it is told 429 + Retry-After and backs off; another address
/// is served meanwhile.
#[test]
fn one_client_over_its_share_is_told_429_and_backs_off_while_others_are_served() {
    let m = Manager::start_with_config(r#"{"maxRequestsPerClientPerSecond":2}"#, &[]);
    m.publish_mv("a", NEW);
    let host = Host::new();
    install_file(&host, "a", OLD, 0o755);
    host.manifest_for(&[("a", &md5_hex(OLD))]);
    let agent = || {
        let mut cmd = host.command(&[]);
        cmd.env("BIN_MANAGER_API", m.api());
        Ran::from_command(&mut cmd)
    };
    // POST check (a new node: registered false), POST keepalive, then the
    // check again: the third in a second from 127.0.0.1.
    let t0 = now();
    let ran = agent();
    let t1 = now();
    ran.expect_code(1);
    let line = log_line(&ran, &["server asks to retry after 1 s", "429 from "]);
    assert!(
        line.contains("/api/v1/check") && line.contains("too many requests from your address"),
        "{line}"
    );
    let until = backoff_until(&host).unwrap();
    assert!(until > t0 && until <= t1 + 2, "{t0} {until} {t1}");
    assert_eq!(fs::read(host.target("a")).unwrap(), OLD);
    // Another address has its own share.
    let r = common::manager::http_from(
        "127.0.0.2".parse().unwrap(),
        "GET",
        &format!("{}/bins/a", m.api()),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body_str());

    // Off by default: the same run against a server without the key works.
    let free = Manager::start(&[]);
    free.publish_mv("a", NEW);
    let mut cmd = host.command(&["--now"]);
    cmd.env("BIN_MANAGER_API", free.api());
    let ran = Ran::from_command(&mut cmd);
    ran.expect_code(0);
    assert_eq!(fs::read(host.target("a")).unwrap(), NEW);
}
