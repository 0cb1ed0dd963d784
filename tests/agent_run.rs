use testkit as common;

// One `bin-proxy` run, end to end, as an operator sees it: the real executable
// against the recording fake bin-manager (`testkit`), in a temp "host"
// (`testkit/src/host.rs`). Every test checks what a user would check: exit
// code, the log line, bytes and modes on disk, the manifest, what the server
// received, and that no temp file is left beside the managed binaries.

use common::host::{assert_unchanged, install_file, log_line, snapshot, Host, Ran, NODE};
use common::json::{parse, try_parse, Json};
use common::{
    json_string, md5_hex, mode, supervisorctl_actions, supervisorctl_log, temp_files, Fault, Style,
};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

const OLD: &[u8] = b"#!/bin/sh\necho old build\n";
const NEW: &[u8] = b"#!/bin/sh\necho new build, much better\n";
const NEWER: &[u8] = b"#!/bin/sh\necho newer build, fixed for real\n";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A host managing `myapp` at `opt/myapp` (holding `OLD`, mode 0750, recorded
/// as installed), with `NEW` published.
fn outdated_host() -> Host {
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    host.manifest_for(&[("myapp", &md5_hex(OLD))]);
    host.server.publish("myapp", NEW);
    host
}

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// One `binaries` entry at `opt/NAME`, with extra string fields.
fn entry(host: &Host, name: &str, hash: &str, extra: &[(&str, &str)]) -> String {
    let mut fields = vec![
        format!("\"name\": {}", json_string(name)),
        "\"version\": \"latest\"".to_string(),
        format!("\"hash\": {}", json_string(hash)),
        format!(
            "\"path\": {}",
            json_string(&host.target(name).display().to_string())
        ),
    ];
    for (k, v) in extra {
        fields.push(format!("{}: {}", json_string(k), json_string(v)));
    }
    format!("    {{\n      {}\n    }}", fields.join(",\n      "))
}

/// Writes a manifest with the test node, an optional `manager` object (raw
/// JSON) and these entries.
fn write_manifest(host: &Host, manager: Option<&str>, entries: &[String]) {
    let manager = manager
        .map(|m| format!("  \"manager\": {m},\n"))
        .unwrap_or_default();
    host.write_manifest(&format!(
        "{{\n{manager}  \"node\": {{\n    \"name\": \"{NODE}\",\n    \"cpuArch\": \"x86_64\",\n    \"osRelease\": \"Test OS 1\",\n    \"proxyVersion\": \"1.0.0\"\n  }},\n  \"binaries\": [\n{}\n  ]\n}}\n",
        entries.join(",\n")
    ));
}

/// The parsed manifest as it is now.
fn manifest_json(host: &Host) -> Json {
    let text = host.manifest_text();
    try_parse(&text).unwrap_or_else(|e| panic!("manifest does not parse: {e}\n{text}"))
}

/// The recorded hash of binary `name` in the manifest.
fn recorded(host: &Host, name: &str) -> String {
    let m = manifest_json(host);
    m.get("binaries")
        .arr()
        .iter()
        .find(|b| b.opt("name").and_then(Json::as_str) == Some(name))
        .and_then(|b| b.opt("hash"))
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("no hash for {name} in\n{}", host.manifest_text()))
        .to_string()
}

/// `2026-11-26T17:26:12Z`: RFC 3339, UTC, second precision.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| s[r].parse().unwrap())
    };
    let seps = b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z';
    match (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) {
        (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) => {
            seps && y >= 2000
                && (1..=12).contains(&mo)
                && (1..=31).contains(&d)
                && h < 24
                && mi < 60
                && se <= 60
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

/// Case 1: an unknown node registers with the six fields the original server
/// binds; a known node with nothing to change does not POST keepalive again.
#[test]
fn first_run_registers_with_all_six_fields_then_known_node_does_not_repost() {
    let host = Host::new();
    install_file(&host, "myapp", NEW, 0o755);
    // The manifest says an old proxyVersion: the agent reports its own.
    host.write_manifest(&format!(
        "{{\n  \"node\": {{\n    \"name\": \"{NODE}\",\n    \"cpuArch\": \"x86_64\",\n    \"osRelease\": \"Test OS 1\",\n    \"proxyVersion\": \"0.0.1\"\n  }},\n  \"binaries\": [\n{}\n  ]\n}}\n",
        entry(&host, "myapp", &md5_hex(NEW), &[])
    ));
    host.server.publish("myapp", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("registered node");

    // The batched check first: the seed's server has none (404), so the seed's calls.
    let mut reqs = host.server.requests();
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("POST", "/api/v1/check")
    );
    reqs.remove(0);
    assert!(reqs.len() >= 2, "{reqs:?}");
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].path.as_str()),
        ("GET", "/api/v1/keepalive")
    );
    assert_eq!(reqs[0].param("node").as_deref(), Some(NODE));
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("POST", "/api/v1/keepalive")
    );
    assert_eq!(reqs[1].param("node").as_deref(), Some(NODE));
    assert_eq!(host.server.count("POST", "/api/v1/keepalive"), 1);

    let body = host.server.registration(NODE).expect("registered");
    let reg = try_parse(&body).unwrap_or_else(|e| panic!("registration body: {e}\n{body}"));
    for key in [
        "name",
        "cpuArch",
        "osRelease",
        "proxyVersion",
        "binaries",
        "lastSeen",
    ] {
        assert!(reg.opt(key).is_some(), "registration lacks {key:?}: {body}");
    }
    assert_eq!(reg.get("name").s(), NODE, "{body}");
    assert_eq!(reg.get("cpuArch").s(), "x86_64");
    assert_eq!(reg.get("osRelease").s(), "Test OS 1");
    assert_eq!(reg.get("proxyVersion").s(), env!("CARGO_PKG_VERSION"));
    assert_eq!(reg.get("proxyVersion").s(), "1.0.0");
    let last_seen = reg.get("lastSeen").s();
    assert!(
        is_rfc3339_utc(last_seen),
        "lastSeen {last_seen:?} is not RFC 3339 UTC"
    );
    let bins = reg.get("binaries").arr();
    assert_eq!(bins.len(), 1, "{body}");
    assert_eq!(bins[0].get("name").s(), "myapp");
    assert_eq!(bins[0].get("version").s(), "latest");
    let hash = md5_hex(NEW);
    assert_eq!(bins[0].get("hash").s(), hash);

    // Known now, and nothing to do: no second registration.
    host.server.clear_requests();
    let ran = host.run(&[]);
    ran.expect_code(0);
    assert!(!ran.stderr.contains("registered node"), "{}", ran.stderr);
    assert_eq!(host.server.count("GET", "/api/v1/keepalive"), 1);
    assert_eq!(host.server.count("POST", "/api/v1/keepalive"), 0);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
}

/// Case 2: an idle run reads nothing it need not, writes nothing, says one line.
#[test]
fn idle_run_downloads_nothing_keeps_manifest_and_logs_one_line() {
    let host = Host::new();
    install_file(&host, "myapp", NEW, 0o755);
    host.manifest_for(&[("myapp", &md5_hex(NEW))]);
    host.server.publish("myapp", NEW);
    host.server.register(NODE, "{}");
    let bytes = fs::read(&host.manifest).unwrap();
    let mtime = fs::metadata(&host.manifest).unwrap().modified().unwrap();
    let before = snapshot(&host);

    for round in 0..2 {
        let ran = host.run(&[]);
        ran.expect_code(0).expect_log("1 binary: 1 up to date");
        assert_eq!(
            ran.stderr.lines().count(),
            1,
            "round {round}: an idle run says one line\n{}",
            ran.stderr
        );
        assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
        assert_eq!(host.server.count("POST", "/api/v1/bins"), 0);
        assert_eq!(host.server.count("POST", "/api/v1/keepalive"), 0);
        assert_eq!(fs::read(&host.manifest).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&host.manifest).unwrap().modified().unwrap(),
            mtime,
            "the manifest was rewritten"
        );
        assert_unchanged(&host, &before, &ran);
    }

    let ran = host.run(&["--quiet"]);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "--quiet idle run must be silent");
    assert_eq!(ran.stdout, "");
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
    assert_eq!(fs::read(&host.manifest).unwrap(), bytes);
}

/// Case 3: the full upgrade path.
#[test]
fn upgrade_swaps_bytes_keeps_mode_and_backup_reports_restarts_and_records() {
    let host = outdated_host();
    host.server.register(NODE, "{}");
    fs::set_permissions(&host.manifest, fs::Permissions::from_mode(0o640)).unwrap();

    let ran = host.run(&[]);
    ran.expect_code(0);
    let line = log_line(&ran, &["myapp", "upgraded"]);
    assert!(line.contains(&md5_hex(NEW)[..8]), "{line}");

    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(fs::read(host.opt.join("myapp.bak")).unwrap(), OLD);
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 1);

    // The manifest: new hash, still pretty, still parseable, mode kept.
    let text = host.manifest_text();
    assert!(text.lines().count() > 10, "not pretty-printed:\n{text}");
    assert!(text.contains("\n  \"binaries\": ["), "{text}");
    assert!(text.ends_with('\n'), "{text:?}");
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert_eq!(mode(&host.manifest), 0o640);

    expect_restart_then_watch(&host, "myapp");

    // The server's inventory hears about the change after the hash report.
    let reqs = host.server.requests();
    let report = reqs
        .iter()
        .position(|r| r.method == "POST" && r.path == "/api/v1/bins/myapp")
        .expect("hash reported");
    let keepalive = reqs
        .iter()
        .rposition(|r| r.method == "POST" && r.path == "/api/v1/keepalive")
        .expect("keepalive POSTed after the change");
    assert!(keepalive > report, "{reqs:?}");
    let reg = parse(&host.server.registration(NODE).unwrap());
    let bins = reg.get("binaries").arr();
    assert_eq!(bins[0].get("hash").s(), md5_hex(NEW));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 4: nothing installed yet.
#[test]
fn fresh_install_gets_mode_0755_and_no_backup() {
    let host = Host::new();
    host.manifest_for(&[("myapp", "")]);
    host.server.publish("myapp", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("not installed yet");
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o755);
    assert!(!host.opt.join("myapp.bak").exists());
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// A `path` whose directory does not exist is most often a typo: the agent
/// says so and creates nothing (no directory tree on a guess, no download);
/// the other binaries go on.
#[test]
fn a_path_in_a_missing_directory_is_named_and_nothing_is_created() {
    let host = Host::new();
    let typo = host.dir.join("usr/lcoal/bin/myapp");
    let entries = [
        format!(
            "{{ \"name\": \"myapp\", \"hash\": \"\", \"path\": {} }}",
            json_string(&typo.display().to_string())
        ),
        entry(&host, "other", "", &[]),
    ];
    write_manifest(&host, None, &entries);
    host.server.publish("myapp", NEW);
    host.server.publish("other", NEWER);

    let ran = host.run(&[]);
    ran.expect_code(1);
    let line = log_line(&ran, &["myapp", "does not exist"]);
    assert!(
        line.contains(&format!(
            "directory \"{}\"",
            typo.parent().unwrap().display()
        )),
        "{line}"
    );
    assert!(line.contains("nothing was downloaded"), "{line}");
    assert!(
        !host.dir.join("usr").exists(),
        "a directory tree was created"
    );
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 0);
    assert_eq!(fs::read(host.target("other")).unwrap(), NEWER);
}

/// Case 5: someone edited the file after it was installed (same size, so only
/// a fresh look at the file can tell).
#[test]
fn file_edited_on_disk_since_recorded_is_reinstalled() {
    let host = Host::new();
    install_file(&host, "myapp", NEW, 0o755);
    host.manifest_for(&[("myapp", &md5_hex(NEW))]);
    host.server.publish("myapp", NEW);
    host.server.register(NODE, "{}");
    host.run(&[]).expect_code(0).expect_log("1 up to date");

    let mut edited = NEW.to_vec();
    edited[10] ^= 0x20; // same length, different bytes
    fs::write(host.target("myapp"), &edited).unwrap();

    let ran = host.run(&[]);
    ran.expect_code(0)
        .expect_log("file changed on disk since it was installed");
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 1);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o755);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );

    // And the next run is idle again.
    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("1 up to date");
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 1);
}

/// Cold state (no state file: the first run after an install), the
/// manifest records an older build: the old file is hashed while the new
/// build downloads. When it turns out to be the published build already,
/// the download is dropped and the manifest records it: the file is not
/// replaced (same inode, no backup), nothing is restarted.
#[test]
fn a_cold_upgrade_that_finds_the_published_build_on_disk_records_it() {
    let host = Host::new();
    install_file(&host, "myapp", NEW, 0o750);
    host.manifest_for(&[("myapp", &md5_hex(OLD))]);
    host.server.publish("myapp", NEW);
    let inode = fs::metadata(host.target("myapp")).unwrap().ino();

    let ran = host.run(&[]);
    ran.expect_code(0).expect_log(&format!(
        "file already is the published build {}",
        &md5_hex(NEW)[..8]
    ));
    assert!(!ran.stderr.contains("upgraded"), "{}", ran.stderr);
    assert_eq!(fs::metadata(host.target("myapp")).unwrap().ino(), inode);
    assert!(!host.opt.join("myapp.bak").exists());
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert!(
        supervisorctl_actions(&host.dir.path).is_empty(),
        "{}",
        ran.stderr
    );
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    // The state learned the file: the next run reads and downloads nothing.
    host.run(&[]).expect_code(0).expect_log("1 up to date");
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 1);
}

/// Cold state, a new build published, and the file is neither the recorded
/// nor the published build: installed, with the drift named once the file
/// was read (during the download); the backup is the file that was there.
#[test]
fn a_cold_upgrade_over_a_changed_file_names_the_change_and_keeps_it_as_backup() {
    let host = Host::new();
    install_file(&host, "myapp", NEWER, 0o750);
    host.manifest_for(&[("myapp", &md5_hex(OLD))]);
    host.server.publish("myapp", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0);
    let line = log_line(
        &ran,
        &["myapp", "file changed on disk since it was installed"],
    );
    assert!(
        line.contains(&format!("on disk {}", &md5_hex(NEWER)[..8])),
        "{line}"
    );
    log_line(
        &ran,
        &["myapp", &format!("upgraded {}", &md5_hex(NEWER)[..8])],
    );
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(fs::read(host.opt.join("myapp.bak")).unwrap(), NEWER);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
}

/// Case 6: the file is gone though the manifest records it.
#[test]
fn deleted_file_is_reinstalled() {
    let host = Host::new();
    host.manifest_for(&[("myapp", &md5_hex(NEW))]);
    host.server.publish("myapp", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("file is missing");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o755);
    assert!(!host.opt.join("myapp.bak").exists());
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 7: the bytes do not hash to what the server promised.
#[test]
fn wrong_md5_changes_nothing_and_reports_nothing() {
    let host = outdated_host();
    host.server.fault("myapp", Fault::WrongHash);
    let before = snapshot(&host);

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "md5 mismatch"]);
    assert_unchanged(&host, &before, &ran);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), OLD);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert!(!host.opt.join("myapp.bak").exists());
    assert!(host.server.reported("myapp").is_empty());
    assert!(supervisorctl_actions(&host.dir.path).is_empty());
}

/// Case 7b: the server offers a sha256 (as bin-manager does): it is checked
/// too, and a build whose md5 matches but whose sha256 does not is refused
/// the same way.
#[test]
fn sha256_is_verified_when_offered() {
    let host = outdated_host();
    host.server.fault("myapp", Fault::WrongSha256);
    let before = snapshot(&host);
    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "sha256 mismatch"]);
    assert_unchanged(&host, &before, &ran);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), OLD);
    assert!(host.server.reported("myapp").is_empty());
    assert!(supervisorctl_actions(&host.dir.path).is_empty());

    host.server.fault("myapp", Fault::Sha256);
    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("myapp: upgraded");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
}

/// Case 8: the connection closes before Content-Length bytes arrived.
#[test]
fn truncated_download_changes_nothing() {
    let host = outdated_host();
    host.server.fault("myapp", Fault::Truncate(5));
    let before = snapshot(&host);

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "truncated"]);
    assert_unchanged(&host, &before, &ran);
    assert!(host.server.reported("myapp").is_empty());
    assert!(supervisorctl_actions(&host.dir.path).is_empty());
}

/// Case 9: one binary's 500 does not stop the others.
#[test]
fn one_binary_failing_with_500_does_not_stop_the_others() {
    let host = Host::new();
    install_file(&host, "broken", OLD, 0o755);
    install_file(&host, "myapp", OLD, 0o750);
    // The failing one comes first.
    host.manifest_for(&[("broken", &md5_hex(OLD)), ("myapp", &md5_hex(OLD))]);
    host.server.publish("broken", NEW);
    host.server.publish("myapp", NEW);
    host.server.fault("broken", Fault::Status(500));

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["broken", "500"]);
    log_line(&ran, &["myapp", "upgraded"]);

    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));

    assert_eq!(fs::read(host.target("broken")).unwrap(), OLD);
    assert_eq!(mode(&host.target("broken")), 0o755);
    assert!(!host.opt.join("broken.bak").exists());
    assert!(host.server.reported("broken").is_empty());
    assert_eq!(recorded(&host, "broken"), md5_hex(OLD));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 10: nobody listens at the API address.
#[test]
fn server_down_exits_1_with_connection_refused() {
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    install_file(&host, "other", OLD, 0o750);
    host.manifest_for(&[("myapp", &md5_hex(OLD)), ("other", &md5_hex(OLD))]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let before = snapshot(&host);

    let out = host
        .command(&[])
        .env("BIN_MANAGER_API", format!("http://127.0.0.1:{port}/api/v1"))
        .output()
        .unwrap();
    let ran = Ran::from(out);
    ran.expect_code(1);
    // One line about the outage (not one per binary and one per heartbeat),
    // and the binaries are not counted as failed.
    let lines: Vec<&str> = ran.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", ran.stderr);
    assert!(
        lines[0].contains(" ERROR server unreachable: ")
            && lines[0].contains("connection refused")
            && lines[0].contains("2 binaries not checked, nothing changed"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with(
            "2 binaries: 0 up to date, 0 changed, 0 failed, 0 held back, 2 not checked (server unreachable)"
        ),
        "{}",
        lines[1]
    );
    assert_unchanged(&host, &before, &ran);
    assert!(host.server.requests().is_empty());
    assert!(supervisorctl_log(&host.dir.path).is_empty());
}

/// Case 11: `bins/NAME` answers malformed JSON.
#[test]
fn garbage_json_exits_1_with_invalid_json() {
    let host = outdated_host();
    host.server.fault("myapp", Fault::Garbage);
    let before = snapshot(&host);

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "invalid JSON"]);
    assert_unchanged(&host, &before, &ran);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
}

/// Case 12: both envelope styles, an error code, and no envelope at all.
#[test]
fn envelope_error_code_fails_while_zero_style_and_bare_answers_work() {
    // An error code in a 200 answer carries the server's message.
    let host = outdated_host();
    host.server
        .fault("myapp", Fault::EnvelopeCode(1, "binary not found".into()));
    let before = snapshot(&host);
    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "binary not found"]);
    assert_unchanged(&host, &before, &ran);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);

    // The original bin-manager: success is code 0.
    let host = outdated_host();
    host.server.set_style(Style::Zero);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert!(host.server.registration(NODE).is_some());

    // No envelope: the object is the data.
    let host = outdated_host();
    host.server.fault("myapp", Fault::NoEnvelope);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 13: preUpgrade vetoes the swap; when it agrees it sees the new file.
#[test]
fn pre_upgrade_failure_aborts_and_success_sees_the_new_file() {
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    write_manifest(
        &host,
        None,
        &[entry(
            &host,
            "myapp",
            &md5_hex(OLD),
            &[(
                "preUpgrade",
                "/bin/sh -c 'echo pre-check says no >&2; exit 3'",
            )],
        )],
    );
    host.server.publish("myapp", NEW);
    let before = snapshot(&host);

    let ran = host.run(&[]);
    ran.expect_code(1);
    // The failed command named, with its exit status and last stderr line.
    let line = log_line(&ran, &["myapp", "preUpgrade \"/bin/sh -c"]);
    assert!(
        line.contains("exited 3: pre-check says no; nothing changed"),
        "{line}"
    );
    assert_unchanged(&host, &before, &ran);
    assert!(host.server.reported("myapp").is_empty());
    assert!(
        supervisorctl_actions(&host.dir.path).is_empty(),
        "{:?}",
        supervisorctl_actions(&host.dir.path)
    );

    // A hook that agrees, and keeps a copy of what it was shown.
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    let hook = host.dir.join("pre.sh");
    let seen = host.dir.join("seen-new");
    let seen_path = host.dir.join("seen-path");
    write_exec(
        &hook,
        &format!(
            "#!/bin/sh\nset -e\ncp \"$BIN_PROXY_NEW_FILE\" '{}'\nprintf '%s' \"$BIN_PROXY_NEW_FILE\" > '{}'\n",
            seen.display(),
            seen_path.display()
        ),
    );
    write_manifest(
        &host,
        None,
        &[entry(
            &host,
            "myapp",
            &md5_hex(OLD),
            &[("preUpgrade", &hook.display().to_string())],
        )],
    );
    host.server.publish("myapp", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(&seen).unwrap(), NEW, "the hook saw other bytes");
    let shown = fs::read_to_string(&seen_path).unwrap();
    assert_eq!(
        Path::new(&shown).parent(),
        Some(host.opt.as_path()),
        "the new file is staged beside its target: {shown}"
    );
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 14: a failing health check rolls back and holds the build back until
/// the server publishes another.
#[test]
fn post_upgrade_failure_rolls_back_and_holds_back_until_a_new_build() {
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    let check = host.dir.join("post.sh");
    let fail_flag = host.dir.join("post.fail");
    write_exec(
        &check,
        &format!(
            "#!/bin/sh\nif [ -e '{}' ]; then echo 'health check failed'; exit 4; fi\nexit 0\n",
            fail_flag.display()
        ),
    );
    fs::write(&fail_flag, b"").unwrap();
    write_manifest(
        &host,
        None,
        &[entry(
            &host,
            "myapp",
            &md5_hex(OLD),
            &[("postUpgrade", &check.display().to_string())],
        )],
    );
    host.server.publish("myapp", NEW);
    let manifest_before = fs::read(&host.manifest).unwrap();

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "rolled back"]);
    log_line(
        &ran,
        &[
            "myapp",
            &format!(
                "postUpgrade \"{}\" exited 4: health check failed",
                check.display()
            ),
        ],
    );
    assert_eq!(fs::read(host.target("myapp")).unwrap(), OLD);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    let ctl = supervisorctl_log(&host.dir.path);
    assert_eq!(
        ctl.iter().filter(|l| *l == "restart myapp").count(),
        2,
        "{ctl:?}"
    );
    assert_eq!(fs::read(&host.manifest).unwrap(), manifest_before);
    assert!(host.server.reported("myapp").is_empty());
    let reg = host.server.registration(NODE).expect("keepalive POSTed");
    assert!(
        reg.contains(&md5_hex(NEW)),
        "the failure is reported in the keepalive body: {reg}"
    );
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );

    // The same build is not tried again.
    host.server.clear_requests();
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "holding back"]);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), OLD);
    assert_eq!(supervisorctl_log(&host.dir.path), ctl);

    // A new build is.
    fs::remove_file(&fail_flag).unwrap();
    host.server.publish("myapp", NEWER);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEWER);
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEWER)]);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEWER));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 15: the restart policy: a failing restart rolls back, "none" never
/// calls supervisorctl, a missing supervisorctl keeps the upgrade with a warning.
#[test]
fn restart_failure_rolls_back_none_skips_and_missing_supervisorctl_warns() {
    // supervisorctl restart fails.
    let host = outdated_host();
    fs::write(host.dir.join("supervisorctl.fail"), "restart").unwrap();
    let manifest_before = fs::read(&host.manifest).unwrap();
    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "rolled back"]);
    // The failed command named, with its status and answer, and where to
    // look for why the program did not start.
    let line = log_line(&ran, &["myapp", "did not come up"]);
    assert!(
        line.contains("supervisorctl restart myapp exited 7: myapp: ERROR (spawn error)"),
        "{line}"
    );
    assert!(line.contains("`supervisorctl tail myapp stderr`"), "{line}");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), OLD);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(fs::read(&host.manifest).unwrap(), manifest_before);
    assert!(host.server.reported("myapp").is_empty());
    let ctl = supervisorctl_log(&host.dir.path);
    assert_eq!(
        ctl.iter().filter(|l| *l == "restart myapp").count(),
        2,
        "{ctl:?}"
    );
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );

    // "restart": "none".
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    write_manifest(
        &host,
        None,
        &[entry(&host, "myapp", &md5_hex(OLD), &[("restart", "none")])],
    );
    host.server.publish("myapp", NEW);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert!(
        supervisorctl_log(&host.dir.path).is_empty(),
        "{:?}",
        supervisorctl_log(&host.dir.path)
    );
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));

    // No supervisorctl on PATH at all.
    let host = outdated_host();
    // The system's own tools, minus supervisorctl (setup.sh installs a real
    // one): build that PATH instead of depending on what is installed.
    let bin = host.dir.join("path-without-supervisorctl");
    fs::create_dir(&bin).unwrap();
    for dir in ["/usr/bin", "/bin"] {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name();
            if name == "supervisorctl" || bin.join(&name).exists() {
                continue;
            }
            std::os::unix::fs::symlink(e.path(), bin.join(&name)).unwrap();
        }
    }
    assert!(!bin.join("supervisorctl").exists());
    let out = host.command(&[]).env("PATH", &bin).output().unwrap();
    let ran = Ran::from(out);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "supervisorctl not found"]);
    assert!(
        ran.stderr
            .lines()
            .any(|l| l.contains(" WARN ") && l.contains("supervisorctl not found")),
        "{}",
        ran.stderr
    );
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert!(supervisorctl_log(&host.dir.path).is_empty());
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 16: one run at a time; the second says so and exits 0 at once.
#[test]
fn second_concurrent_run_exits_0_while_the_lock_is_held() {
    let host = outdated_host();
    let mut lock_path = host.manifest.clone().into_os_string();
    lock_path.push(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    lock.try_lock().expect("the test takes the run lock");
    let before = snapshot(&host);

    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("holds the lock");
    assert!(
        host.server.requests().is_empty(),
        "{:?}",
        host.server.requests()
    );
    assert_unchanged(&host, &before, &ran);
    assert!(supervisorctl_log(&host.dir.path).is_empty());

    // Released: the next run does the work.
    lock.unlock().unwrap();
    drop(lock);
    let ran = host.run(&[]);
    ran.expect_code(0);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
}

/// Case 17: a killed run's temp files are swept by the next one.
#[test]
fn stale_temp_files_from_a_killed_run_are_removed() {
    let host = Host::new();
    install_file(&host, "myapp", NEW, 0o755);
    host.manifest_for(&[("myapp", &md5_hex(NEW))]);
    host.server.publish("myapp", NEW);
    fs::write(host.opt.join(".myapp.999.bin-proxy-tmp"), b"half a file").unwrap();
    fs::write(
        host.opt.join(".myapp.999dl.bin-proxy-tmp"),
        b"half a download",
    )
    .unwrap();
    fs::write(host.opt.join("notes.txt"), b"not ours").unwrap();
    assert_eq!(temp_files(&host.opt).len(), 2);

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "2 temp file"]);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    assert_eq!(fs::read(host.opt.join("notes.txt")).unwrap(), b"not ours");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
}

/// Case 18: `--only`.
#[test]
fn only_handles_just_that_binary_and_unknown_name_exits_2() {
    let host = Host::new();
    install_file(&host, "alpha", OLD, 0o755);
    install_file(&host, "beta", OLD, 0o755);
    host.manifest_for(&[("alpha", &md5_hex(OLD)), ("beta", &md5_hex(OLD))]);
    host.server.publish("alpha", NEW);
    host.server.publish("beta", NEW);

    let ran = host.run(&["--only", "alpha"]);
    ran.expect_code(0);
    log_line(&ran, &["alpha", "upgraded"]);
    assert_eq!(fs::read(host.target("alpha")).unwrap(), NEW);
    assert_eq!(fs::read(host.target("beta")).unwrap(), OLD);
    assert_eq!(host.server.count("*", "/api/v1/bins/beta"), 0);
    assert_eq!(host.server.count("*", "/api/v1/download/beta"), 0);
    assert_eq!(recorded(&host, "beta"), md5_hex(OLD));
    assert!(!ran.stderr.contains("beta"), "{}", ran.stderr);

    host.server.clear_requests();
    let before = snapshot(&host);
    let ran = host.run(&["--only", "unknown"]);
    ran.expect_code(2)
        .expect_log("--only \"unknown\": no such binary in the manifest");
    assert_unchanged(&host, &before, &ran);
    assert!(
        host.server.requests().is_empty(),
        "{:?}",
        host.server.requests()
    );
}

/// Case 19: the bearer token goes with every request and never into the log.
#[test]
fn bearer_token_is_sent_with_every_request_and_never_printed() {
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    install_file(&host, "broken", OLD, 0o755);
    host.manifest_for(&[("myapp", &md5_hex(OLD)), ("broken", &md5_hex(OLD))]);
    host.server.publish("myapp", NEW);
    host.server.publish("broken", NEW);
    host.server.fault("broken", Fault::Status(500));

    for args in [&[][..], &["--verbose"][..]] {
        let out = host
            .command(args)
            .env("BIN_MANAGER_TOKEN", "s3cret")
            .output()
            .unwrap();
        let ran = Ran::from(out);
        ran.expect_code(1);
        log_line(&ran, &["broken", "500"]);
        assert!(
            !ran.stderr.contains("s3cret"),
            "token in the log:\n{}",
            ran.stderr
        );
        assert!(
            !ran.stdout.contains("s3cret"),
            "token on stdout:\n{}",
            ran.stdout
        );
    }
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    let reqs = host.server.requests();
    // keepalive GET+POST, bins GET, download, hash report, keepalive after change…
    assert!(reqs.len() >= 6, "{reqs:?}");
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer s3cret"),
            "{} {}",
            r.method,
            r.path
        );
    }

    // The token from manager.tokenFile.
    let host = outdated_host();
    let token_file = host.dir.join("etc/token");
    fs::write(&token_file, "filetoken\n").unwrap();
    write_manifest(
        &host,
        Some(&format!(
            "{{ \"tokenFile\": {} }}",
            json_string(&token_file.display().to_string())
        )),
        &[entry(&host, "myapp", &md5_hex(OLD), &[])],
    );
    let ran = host.run(&[]);
    ran.expect_code(0);
    assert!(!ran.stderr.contains("filetoken"), "{}", ran.stderr);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    let reqs = host.server.requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer filetoken"),
            "{} {}",
            r.method,
            r.path
        );
    }
}

/// Case 20: names are percent-encoded in URLs.
#[test]
fn names_are_percent_encoded_in_urls() {
    let host = Host::new();
    // supervisor refuses spaces in program names, so the service has its own.
    write_manifest(
        &host,
        None,
        &[entry(&host, "my app", "", &[("service", "my-app")])],
    );
    host.server.publish("my app", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["my app", "upgraded"]);
    let paths: Vec<(String, String)> = host
        .server
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    for want in [
        ("GET", "/api/v1/bins/my%20app"),
        ("GET", "/api/v1/download/my%20app"),
        ("POST", "/api/v1/bins/my%20app"),
    ] {
        assert!(
            paths.iter().any(|(m, p)| m == want.0 && p == want.1),
            "no {want:?} in {paths:?}"
        );
    }
    assert_eq!(fs::read(host.target("my app")).unwrap(), NEW);
    assert_eq!(host.server.reported("my app"), [md5_hex(NEW)]);
    assert_eq!(recorded(&host, "my app"), md5_hex(NEW));
    expect_restart_then_watch(&host, "my-app");
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 21: `--max-size`.
#[test]
fn max_size_refuses_a_larger_download_and_names_the_limit() {
    let host = outdated_host();
    assert!(NEW.len() > 10);
    let before = snapshot(&host);

    let ran = host.run(&["--max-size", "10"]);
    ran.expect_code(1);
    let line = log_line(&ran, &["myapp", "limit"]);
    assert!(line.contains("10 B"), "the limit is not named: {line}");
    assert_unchanged(&host, &before, &ran);
    assert!(host.server.reported("myapp").is_empty());
}

/// Case 22: a download that redirects to itself forever.
#[test]
fn redirect_loop_fails_after_a_bounded_number_of_requests() {
    let host = outdated_host();
    host.server.fault("myapp", Fault::RedirectLoop);
    let before = snapshot(&host);

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "redirects"]);
    assert_unchanged(&host, &before, &ran);
    let n = host.server.count("GET", "/api/v1/download/myapp");
    assert!((1..=20).contains(&n), "{n} download requests");
}

/// Case 23: a manifest in the seed's format stays in the seed's format.
#[test]
fn seed_manifest_keeps_exactly_the_seed_keys_after_an_upgrade() {
    let host = outdated_host();
    let original = host.manifest_text();

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["myapp", "upgraded"]);

    let m = manifest_json(&host);
    assert_eq!(m.keys(), ["node", "binaries"], "{}", host.manifest_text());
    let node = m.get("node");
    assert_eq!(
        node.keys(),
        ["name", "cpuArch", "osRelease", "proxyVersion"]
    );
    assert_eq!(node.get("name").s(), NODE);
    assert_eq!(node.get("osRelease").s(), "Test OS 1");
    let bins = m.get("binaries").arr();
    assert_eq!(bins.len(), 1);
    assert_eq!(bins[0].keys(), ["name", "version", "hash", "path"]);
    assert_eq!(bins[0].get("version").s(), "latest");
    assert_eq!(
        bins[0].get("path").s(),
        host.target("myapp").display().to_string()
    );
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    // What an operator's `diff` shows: only the hash changed.
    assert_eq!(
        host.manifest_text(),
        original.replace(&md5_hex(OLD), &md5_hex(NEW))
    );
}

/// supervisorctl was asked to restart `service` once, then only for its
/// status, several times: the watch window in which it must stay RUNNING
/// with the same pid (3 s by default, polled every 0.5 s).
fn expect_restart_then_watch(host: &Host, service: &str) {
    let mut log = supervisorctl_log(&host.dir.path);
    // First the question whether supervisord can restart it at all.
    assert_eq!(
        log.first().map(String::as_str),
        Some(format!("status {service}").as_str()),
        "{log:?}"
    );
    log.remove(0);
    assert_eq!(
        log.first().map(String::as_str),
        Some(format!("restart {service}").as_str()),
        "{log:?}"
    );
    assert!(
        log[1..].iter().all(|l| *l == format!("status {service}")),
        "{log:?}"
    );
    assert!(log.len() > 3, "watched for less than the window: {log:?}");
}

#[test]
fn token_goes_only_to_the_configured_origins_never_to_a_binarys_own_download_url() {
    let host = Host::new();
    let cdn = common::Server::start();
    host.server.publish("app", NEW);
    cdn.publish("app", NEW);
    host.write_manifest(&format!(
        r#"{{"node":{{"name":"{NODE}"}},"binaries":[{{"name":"app","hash":"","path":"{}","restart":"none","downloadUrl":"{}/download/app"}}]}}"#,
        host.target("app").display(),
        cdn.api()
    ));
    let ran = Ran::from_command(host.command(&[]).env("BIN_MANAGER_TOKEN", "s3cret"));
    ran.expect_code(0).expect_log("app: upgraded");
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);
    let api = host.server.requests();
    assert!(
        !api.is_empty()
            && api
                .iter()
                .all(|r| r.header("authorization") == Some("Bearer s3cret")),
        "the API gets the token"
    );
    let cdn_requests = cdn.requests();
    assert_eq!(
        cdn_requests.len(),
        1,
        "one download from the binary's own URL"
    );
    assert_eq!(
        cdn_requests[0].header("authorization"),
        None,
        "a binary's own downloadUrl on another origin never gets the token"
    );
    assert!(!ran.stderr.contains("s3cret"));
}

/// The node token the server issues on registration is kept in the state
/// file (mode 0600, never logged) and sent as `X-Node-Token` with every
/// later request about this node — heartbeat, build lookups and downloads
/// (with `node=`), reports, the inventory — and never to another origin.
#[test]
fn the_node_token_is_kept_private_and_sent_about_this_node_only() {
    let host = Host::new();
    let cdn = common::Server::start();
    let token = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    host.server.issue_token(token);
    host.server.publish("app", OLD);
    host.server.publish("tool", OLD);
    cdn.publish("tool", OLD);
    host.write_manifest(&format!(
        r#"{{"node":{{"name":"{NODE}"}},"binaries":[
            {{"name":"app","hash":"","path":"{}","restart":"none"}},
            {{"name":"tool","hash":"","path":"{}","restart":"none","downloadUrl":"{}/download/tool"}}]}}"#,
        host.target("app").display(),
        host.target("tool").display(),
        cdn.api()
    ));
    let ran = host.run(&[]);
    ran.expect_code(0)
        .expect_log("keeping the node token the server issued");
    let state = host.dir.join("etc/bin-manifests.json.state");
    assert_eq!(mode(&state), 0o600);
    assert!(fs::read_to_string(&state).unwrap().contains(token));
    // The first run registered (no token yet), then sent it from there on
    // (after the batched check the seed's server does not have).
    let mut first = host.server.requests();
    assert_eq!(first[0].path, "/api/v1/check");
    first.remove(0);
    assert_eq!(
        (first[0].method.as_str(), first[0].header("x-node-token")),
        ("GET", None)
    );
    assert_eq!(
        (first[1].method.as_str(), first[1].header("x-node-token")),
        ("POST", None)
    );
    for r in &first[2..] {
        assert_eq!(
            r.header("x-node-token"),
            Some(token),
            "{} {}",
            r.method,
            r.path
        );
    }

    // An upgrade: heartbeat, lookups, download, report and inventory all carry it.
    host.server.clear_requests();
    host.server.register(NODE, "{}");
    host.server.publish("app", NEW);
    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("app: upgraded");
    let seen: Vec<(String, String, Option<String>)> = host
        .server
        .requests()
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.path.clone(),
                r.header("x-node-token").map(str::to_string),
            )
        })
        .collect();
    let with = |m: &str, p: &str| (m.to_string(), p.to_string(), Some(token.to_string()));
    for want in [
        with("GET", "/api/v1/keepalive"),
        with("GET", "/api/v1/bins/app"),
        with("GET", "/api/v1/download/app"),
        with("POST", "/api/v1/bins/app"),
        with("POST", "/api/v1/keepalive"),
    ] {
        assert!(seen.contains(&want), "no {want:?} in {seen:?}");
    }
    assert!(
        seen.iter().all(|(_, _, t)| t.as_deref() == Some(token)),
        "{seen:?}"
    );
    let lookups = host.server.requests();
    let lookup = lookups
        .iter()
        .find(|r| r.path == "/api/v1/bins/app")
        .unwrap();
    assert_eq!(lookup.param("node").as_deref(), Some(NODE));
    assert!(
        cdn.requests()
            .iter()
            .all(|r| r.header("x-node-token").is_none()),
        "another origin got the node token"
    );
    for out in [&ran.stderr, &ran.stdout] {
        assert!(!out.contains(token), "the node token was printed");
    }
}

/// A real TLS server (`openssl s_server`) on a free port of 127.0.0.1,
/// killed by its pid when dropped.
struct TlsServer {
    child: std::process::Child,
    port: u16,
}

impl TlsServer {
    fn start(dir: &Path) -> Option<TlsServer> {
        let have = Path::new("/usr/bin/openssl").exists();
        if !common::can_run(
            have,
            "openssl is not installed (scripts/setup.sh installs it)",
        ) {
            return None;
        }
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let (child, port) = common::start_on_free_port("openssl s_server", |port| {
            let mut cmd = std::process::Command::new("openssl");
            cmd.args([
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("-key")
            .arg(&key)
            .arg("-cert")
            .arg(&cert);
            cmd
        });
        Some(TlsServer { child, port })
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `https://` against a plain-HTTP port and `http://` against a TLS port
/// fail at once, with the hint that fixes them, in one line, and are not
/// retried (a download would otherwise be tried three times).
#[test]
fn tls_against_plain_http_or_the_reverse_fails_at_once_with_a_hint() {
    let host = outdated_host();
    let before = snapshot(&host);
    let plain = host.server.url().replace("http://", "https://");
    let ran = Ran::from(
        host.command(&[])
            .env("BIN_MANAGER_API", format!("{plain}/api/v1"))
            .output()
            .unwrap(),
    );
    ran.expect_code(1);
    let hint = format!(
        "127.0.0.1:{} did not answer TLS — is the URL http://?",
        host.server.port()
    );
    let line = log_line(&ran, &[&hint]);
    assert!(line.contains("cannot talk to the server"), "{line}");
    assert_eq!(ran.stderr.matches(&hint).count(), 1, "{}", ran.stderr);
    assert_unchanged(&host, &before, &ran);

    // A download from a plain port named https://: not retried.
    let host = Host::new();
    install_file(&host, "myapp", OLD, 0o750);
    let url = format!(
        "{}/api/v1/download/myapp",
        host.server.url().replace("http://", "https://")
    );
    write_manifest(
        &host,
        None,
        &[entry(
            &host,
            "myapp",
            &md5_hex(OLD),
            &[("downloadUrl", &url)],
        )],
    );
    host.server.publish("myapp", NEW);
    let before = snapshot(&host);
    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["myapp", "did not answer TLS — is the URL http://?"]);
    assert!(!ran.stderr.contains("retrying"), "retried:\n{}", ran.stderr);
    assert_unchanged(&host, &before, &ran);

    // http:// against a TLS port.
    let host = outdated_host();
    let Some(tls) = TlsServer::start(&host.dir.path) else {
        return;
    };
    let before = snapshot(&host);
    let ran = Ran::from(
        host.command(&[])
            .env(
                "BIN_MANAGER_API",
                format!("http://127.0.0.1:{}/api/v1", tls.port),
            )
            .output()
            .unwrap(),
    );
    ran.expect_code(1);
    log_line(
        &ran,
        &[&format!(
            "127.0.0.1:{} answered in TLS, not plain HTTP — is the URL https://?",
            tls.port
        )],
    );
    assert_unchanged(&host, &before, &ran);
}

/// supervisord goes away between the check before the swap and the
/// restart: the backup goes back and the build is not held back (the fault
/// was supervisord's), so the run after supervisord is back installs it.
#[test]
fn supervisord_lost_during_the_restart_rolls_back_without_holding_back() {
    let host = outdated_host();
    let (ctl, down, breaks) = scripted_supervisorctl(&host);
    fs::write(&breaks, b"").unwrap();
    let run = || {
        Ran::from(
            host.command(&[])
                .env("BIN_PROXY_SUPERVISORCTL", &ctl)
                .output()
                .unwrap(),
        )
    };
    let ran = run();
    ran.expect_code(1);
    log_line(&ran, &["myapp", "rolled back to"]);
    log_line(&ran, &["myapp", "not held back"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), OLD);
    assert!(
        !fs::read_to_string(host.manifest.with_extension("json.state"))
            .unwrap_or_default()
            .contains(&md5_hex(NEW)),
        "held back"
    );

    // supervisord is back: the next run installs the build.
    fs::remove_file(&down).unwrap();
    fs::remove_file(&breaks).unwrap();
    let ran = run();
    ran.expect_code(0).expect_log("myapp: upgraded");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
}

/// A supervisorctl that answers like a real one until the file `down`
/// exists ("unix:///run/supervisor.sock no such file", exit 4); a restart
/// while the file `breaks` exists creates `down` (supervisord dies then).
/// Returns (the script, down, breaks).
fn scripted_supervisorctl(
    host: &Host,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ctl = host.dir.join("ctl.sh");
    let down = host.dir.join("down");
    let breaks = host.dir.join("restart-breaks-it");
    write_exec(
        &ctl,
        &format!(
            "#!/bin/sh\nwhile [ $# -gt 1 ]; do case $1 in status|restart) break;; esac; shift; done\n\
             if [ -e '{down}' ]; then echo 'unix:///run/supervisor.sock no such file'; exit 4; fi\n\
             case $1 in\n  status) printf '%-32s %-10s%s\\n' \"$2\" RUNNING 'pid 4242, uptime 0:00:05';;\n\
             \x20 restart) if [ -e '{breaks}' ]; then : > '{down}'; echo 'unix:///run/supervisor.sock no such file'; exit 7; fi\n\
             \x20   printf '%s: stopped\\n%s: started\\n' \"$2\" \"$2\";;\nesac\n",
            down = down.display(),
            breaks = breaks.display()
        ),
    );
    (ctl, down, breaks)
}

/// A run killed after its swap left the journal; supervisord is down when
/// the next run would confirm: the journal stays, nothing is held back, and
/// the run after supervisord is back confirms and records the build.
#[test]
fn an_interrupted_upgrade_waits_for_supervisord_to_be_confirmed() {
    let host = Host::new();
    install_file(&host, "myapp", NEW, 0o750); // swapped in by the killed run
    install_file(&host, "myapp.bak", OLD, 0o750);
    host.manifest_for(&[("myapp", &md5_hex(OLD))]);
    host.server.publish("myapp", NEW);
    let state = host.manifest.with_extension("json.state");
    fs::write(
        &state,
        format!(
            "{{\"files\":[],\"quarantine\":[],\"pending\":[{{\"name\":\"myapp\",\"old\":\"{}\",\"new\":\"{}\",\"at\":\"2026-01-01T00:00:00Z\"}}]}}",
            md5_hex(OLD),
            md5_hex(NEW)
        ),
    )
    .unwrap();
    let (ctl, down, _) = scripted_supervisorctl(&host);
    fs::write(&down, b"").unwrap();
    let run = || {
        Ran::from(
            host.command(&[])
                .env("BIN_PROXY_SUPERVISORCTL", &ctl)
                .output()
                .unwrap(),
        )
    };

    let ran = run();
    ran.expect_code(1);
    let line = log_line(&ran, &["myapp", "cannot confirm"]);
    assert!(
        line.contains("no such file") && line.contains("not held back"),
        "{line}"
    );
    let text = fs::read_to_string(&state).unwrap();
    assert!(
        text.contains("\"pending\"") && text.contains(&md5_hex(NEW)),
        "journal kept: {text}"
    );
    assert_eq!(recorded(&host, "myapp"), md5_hex(OLD), "not committed");
    assert!(host.server.reported("myapp").is_empty());

    fs::remove_file(&down).unwrap();
    let ran = run();
    ran.expect_code(0)
        .expect_log("interrupted after swapping in")
        .expect_log("myapp: upgraded");
    assert_eq!(recorded(&host, "myapp"), md5_hex(NEW));
    assert_eq!(host.server.reported("myapp"), [md5_hex(NEW)]);
    assert!(!fs::read_to_string(&state)
        .unwrap()
        .contains(&format!("\"new\": \"{}\"", md5_hex(NEW))));
}
