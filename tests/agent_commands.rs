use testkit as common;

// The agent's commands as an operator uses them: manifest validation, `check`,
// `status`, `init`, `rollback`, `retry`, `--help`/`--version`, the precedence of
// flags, environment and manifest, loop mode, splay, the log format and how the
// manifest is rewritten. Every test runs the real `bin-proxy` executable.

use common::host::{Host, NODE};
use common::json::Json;
use common::{
    md5_hex, mode, path_with, supervisorctl_log, temp_files, wait_until, Fault, Server, TempDir,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_bin-proxy");

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A `bin-proxy` command with none of the agent's settings inherited from the
/// test's own environment and no `--config`.
fn bare(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("BIN_PROXY_CONFIG")
        .env_remove("BIN_MANAGER_API")
        .env_remove("BIN_DOWNLOAD_URL")
        .env_remove("BIN_MANAGER_TOKEN")
        .env_remove("BIN_PROXY_SUPERVISORCTL");
    common::without_proxies(&mut cmd);
    cmd
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn output(cmd: &mut Command) -> Out {
    let out = cmd.output().expect("run bin-proxy");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Out {
    fn expect_code(&self, code: i32) -> &Out {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Kills the child when dropped (so a failing assertion never leaks a loop-mode agent).
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` with output going to files under `dir`; kills it and panics if it
/// has not exited within `limit`.
fn run_bounded(mut cmd: Command, dir: &Path, limit: Duration) -> Out {
    let out_path = dir.join("bounded.stdout");
    let err_path = dir.join("bounded.stderr");
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap());
    let mut child = Reaper(cmd.spawn().expect("spawn bin-proxy"));
    let mut status = None;
    let finished = wait_until(limit, || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    });
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        finished,
        "bin-proxy did not exit within {limit:?}\n--- stderr\n{stderr}"
    );
    Out {
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr,
    }
}

/// `first 8 hex digits` + `…`, as log lines and the status table show hashes.
fn short(hash: &str) -> String {
    format!("{}…", &hash[..8])
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

fn sibling(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The state file the agent keeps beside the manifest.
fn state_file(host: &Host) -> PathBuf {
    sibling(&host.manifest, ".state")
}

/// The run lock beside the manifest.
fn lock_file(host: &Host) -> PathBuf {
    sibling(&host.manifest, ".lock")
}

/// One binary entry of a hand-written manifest, at `opt/NAME`; `extra` is more
/// JSON members starting with a comma (or "").
fn entry(host: &Host, name: &str, hash: &str, extra: &str) -> String {
    format!(
        "    {{\n      \"name\": \"{name}\",\n      \"version\": \"latest\",\n      \"hash\": \"{hash}\",\n      \"path\": \"{}\"{extra}\n    }}",
        host.target(name).display()
    )
}

/// Writes a manifest with an optional `manager` object (its members, e.g.
/// `"api": "…"`) and these entries.
fn write_manifest(host: &Host, manager: &str, entries: &[String]) {
    let manager = if manager.is_empty() {
        String::new()
    } else {
        format!("  \"manager\": {{ {manager} }},\n")
    };
    host.write_manifest(&format!(
        "{{\n{manager}  \"node\": {{ \"name\": \"{NODE}\", \"cpuArch\": \"x86_64\", \"osRelease\": \"Test OS 1\", \"proxyVersion\": \"1.0.0\" }},\n  \"binaries\": [\n{}\n  ]\n}}\n",
        entries.join(",\n")
    ));
}

/// Splits one row of the status table into its cells (columns are separated
/// by at least two spaces; cells such as "up to date" contain single spaces).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// Whether a log line is `YYYY-MM-DDTHH:MM:SSZ LEVEL …`.
fn well_formed_log_line(line: &str) -> bool {
    let b = line.as_bytes();
    if b.len() < 21 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let stamp_ok = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'Z'
        && b[20] == b' ';
    stamp_ok
        && ["INFO ", "WARN ", "ERROR "]
            .iter()
            .any(|lvl| line[21..].starts_with(lvl))
}

/// A host with `myapp` installed (old build, mode 0750, recorded in a
/// seed-format manifest) and a new build published.
fn upgradable_host() -> (Host, Vec<u8>, Vec<u8>) {
    let host = Host::new();
    let old = b"#!/bin/sh\necho old build\n".to_vec();
    let new = b"#!/bin/sh\necho new build, rather longer\n".to_vec();
    fs::write(host.target("myapp"), &old).unwrap();
    fs::set_permissions(host.target("myapp"), fs::Permissions::from_mode(0o750)).unwrap();
    host.manifest_for(&[("myapp", &md5_hex(&old))]);
    host.server.publish("myapp", &new);
    (host, old, new)
}

/// Asserts that a rejected manifest changed nothing and reached no server.
fn assert_untouched(host: &Host, manifest_before: &[u8], what: &str) {
    assert_eq!(
        fs::read(&host.manifest).unwrap(),
        manifest_before,
        "{what}: manifest bytes changed"
    );
    assert!(
        host.server.requests().is_empty(),
        "{what}: requests were sent: {:?}",
        host.server.requests()
    );
    assert!(
        !state_file(host).exists(),
        "{what}: a state file was created"
    );
    assert!(
        supervisorctl_log(&host.dir.path).is_empty(),
        "{what}: supervisorctl was called"
    );
    assert!(temp_files(&host.opt).is_empty(), "{what}: temp files left");
}

// ---------------------------------------------------------------------------
// 1–3: manifest validation
// ---------------------------------------------------------------------------

#[test]
fn malformed_manifest_names_file_line_and_column_and_touches_nothing() {
    let host = Host::new();
    let app = b"#!/bin/sh\necho installed\n".to_vec();
    fs::write(host.target("myapp"), &app).unwrap();
    host.server.publish("myapp", b"a newer build");
    // Line 3 lacks the comma between two members: the parser stops at `"path"`.
    let text = format!(
        "{{\n  \"binaries\": [\n    {{ \"name\": \"myapp\" \"path\": \"{}\" }}\n  ]\n}}\n",
        host.target("myapp").display()
    );
    host.write_manifest(&text);
    let app_mtime = mtime(&host.target("myapp"));
    let app_mode = mode(&host.target("myapp"));

    let ran = host.run(&[]);
    ran.expect_code(2);
    assert!(
        ran.stderr.contains(&host.manifest.display().to_string()),
        "the error must name the manifest {}\n{}",
        host.manifest.display(),
        ran.stderr
    );
    // `    { "name": "myapp" "path"`: the unexpected string starts in column 23.
    ran.expect_log("line 3, column 23");
    assert_untouched(&host, text.as_bytes(), "malformed manifest");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), app);
    assert_eq!(mtime(&host.target("myapp")), app_mtime);
    assert_eq!(mode(&host.target("myapp")), app_mode);
    assert!(!host.opt.join("myapp.bak").exists());
}

#[test]
fn unknown_key_in_a_binary_entry_is_named() {
    let host = Host::new();
    host.server.publish("myapp", b"build");
    let text = format!(
        "{{\n  \"binaries\": [\n    {{ \"name\": \"myapp\", \"hash\": \"\", \"pth\": \"{}\" }}\n  ]\n}}\n",
        host.target("myapp").display()
    );
    host.write_manifest(&text);

    let ran = host.run(&[]);
    ran.expect_code(2)
        .expect_log(&host.manifest.display().to_string())
        .expect_log("binaries[0] (\"myapp\")")
        .expect_log("unknown key \"pth\"");
    assert_untouched(&host, text.as_bytes(), "unknown key");
    assert!(!host.target("myapp").exists(), "nothing may be installed");
}

#[test]
fn invalid_entries_and_a_missing_manifest_are_refused() {
    let md5_a = md5_hex(b"a");
    type Entries = Box<dyn Fn(&Host) -> Vec<String>>;
    let cases: Vec<(&str, Entries, Vec<String>)> = vec![
        (
            "duplicate names",
            Box::new(|h: &Host| {
                let second = format!(
                    "    {{ \"name\": \"myapp\", \"hash\": \"\", \"path\": \"{}\" }}",
                    h.target("other").display()
                );
                vec![entry(h, "myapp", "", ""), second]
            }),
            vec![
                "duplicate name \"myapp\"".into(),
                "binaries[1]".into(),
                "binaries[0]".into(),
            ],
        ),
        (
            "duplicate paths",
            Box::new(|h: &Host| {
                let second = format!(
                    "    {{ \"name\": \"other\", \"hash\": \"\", \"path\": \"{}\" }}",
                    h.target("myapp").display()
                );
                vec![entry(h, "myapp", "", ""), second]
            }),
            vec![
                "binaries[1] (\"other\")".into(),
                "collides with binaries[0] (\"myapp\")".into(),
            ],
        ),
        (
            "relative path",
            Box::new(|_: &Host| {
                vec![
                    "    { \"name\": \"myapp\", \"hash\": \"\", \"path\": \"opt/myapp\" }"
                        .to_string(),
                ]
            }),
            vec![
                "binaries[0] (\"myapp\")".into(),
                "key \"path\" must be an absolute path".into(),
                "\"opt/myapp\"".into(),
            ],
        ),
        (
            "short hash",
            Box::new(|h: &Host| vec![entry(h, "myapp", "abc123", "")]),
            vec![
                "binaries[0] (\"myapp\")".into(),
                "key \"hash\" must be 32 hex digits".into(),
                "\"abc123\"".into(),
            ],
        ),
        (
            "non-hex hash",
            Box::new(move |h: &Host| vec![entry(h, "myapp", &format!("{}zz", &md5_a[..30]), "")]),
            vec![
                "binaries[0] (\"myapp\")".into(),
                "key \"hash\" must be 32 hex digits".into(),
            ],
        ),
    ];
    for (what, entries, expected) in cases {
        let host = Host::new();
        host.server.publish("myapp", b"published");
        host.server.publish("other", b"published too");
        write_manifest(&host, "", &entries(&host));
        let before = fs::read(&host.manifest).unwrap();
        let ran = host.run(&[]);
        assert_eq!(ran.code, 2, "{what}: exit code\n{}", ran.stderr);
        ran.expect_log(&host.manifest.display().to_string());
        for text in &expected {
            assert!(
                ran.stderr.contains(text.as_str()),
                "{what}: log lacks {text:?}\n{}",
                ran.stderr
            );
        }
        assert_untouched(&host, &before, what);
        assert!(
            !host.target("myapp").exists() && !host.target("other").exists(),
            "{what}: something was installed"
        );
    }

    // A manifest that does not exist, in a directory that does.
    let host = Host::new();
    let ran = host.run(&[]);
    assert_eq!(ran.code, 2, "missing manifest: exit code\n{}", ran.stderr);
    assert!(ran.stderr.contains("bin-proxy init"), "{}", ran.stderr);
    let quoted = format!("\"{}\"", host.manifest.display());
    assert!(
        ran.stderr.contains(&quoted),
        "missing manifest: the error must name {quoted}\n{}",
        ran.stderr
    );
    assert!(host.server.requests().is_empty());
    assert!(
        !host.manifest.exists(),
        "a missing manifest must not be created by a run"
    );
    eprintln!("missing manifest: exit {}: {}", ran.code, ran.stderr);
}

/// Mistakes that would otherwise surface only after a download and a swap
/// (and blame the build): found when the manifest and settings are read,
/// exit 2, nothing touched, no request sent.
#[test]
fn load_time_mistakes_name_where_they_are_and_touch_nothing() {
    // (what, manager JSON, extra keys of the entry, args, env, expected texts)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a [&'a str],
        Option<&'a str>,
        &'a [&'a str],
    );
    let cases: &[Case] = &[
        (
            "unclosed quote in postUpgrade",
            "",
            ",\n      \"postUpgrade\": \"/usr/local/bin/x --check 'quick\"",
            &[],
            None,
            &[
                "binaries[0] (\"myapp\")",
                "key \"postUpgrade\"",
                "unclosed quote",
            ],
        ),
        (
            "unclosed quote in restart",
            "",
            ",\n      \"restart\": \"systemctl \\\"restart myapp\"",
            &[],
            None,
            &[
                "binaries[0] (\"myapp\")",
                "key \"restart\"",
                "unclosed quote",
            ],
        ),
        (
            "manager.api without a scheme",
            "\"api\": \"mgr:8081/api/v1\"",
            "",
            &[],
            None,
            &[
                "\"manager\": key \"api\"",
                "\"mgr:8081/api/v1\"",
                "http:// or https://",
            ],
        ),
        (
            "--api without a scheme",
            "",
            "",
            &["--api", "mgr:8081/api/v1"],
            None,
            &["--api \"mgr:8081/api/v1\" must start with http:// or https://"],
        ),
        (
            "BIN_MANAGER_API without a scheme",
            "",
            "",
            &[],
            Some("127.0.0.1:8081/api/v1"),
            &["$BIN_MANAGER_API \"127.0.0.1:8081/api/v1\" must start with http:// or https://"],
        ),
    ];
    for (what, manager, extra, args, env, expected) in cases {
        let host = Host::new();
        host.server.publish("myapp", b"published");
        write_manifest(&host, manager, &[entry(&host, "myapp", "", extra)]);
        let before = fs::read(&host.manifest).unwrap();
        let mut cmd = host.command(args);
        if let Some(api) = env {
            cmd.env("BIN_MANAGER_API", api);
        }
        let ran = output(&mut cmd);
        assert_eq!(ran.code, 2, "{what}: exit code\n{}", ran.stderr);
        for text in *expected {
            assert!(
                ran.stderr.contains(text),
                "{what}: log lacks {text:?}\n{}",
                ran.stderr
            );
        }
        if args.is_empty() && env.is_none() {
            let file = host.manifest.display().to_string();
            assert!(
                ran.stderr.contains(&file),
                "{what}: names the file\n{}",
                ran.stderr
            );
        }
        assert_untouched(&host, &before, what);
        assert!(
            !host.target("myapp").exists(),
            "{what}: something was installed"
        );
    }

    // A trailing comma: strict JSON, with line and column.
    let host = Host::new();
    host.server.publish("myapp", b"published");
    let text = format!(
        "{{\n  \"binaries\": [\n    {{ \"name\": \"myapp\", \"hash\": \"\", \"path\": \"{}\" }},\n  ]\n}}\n",
        host.target("myapp").display()
    );
    host.write_manifest(&text);
    let ran = host.run(&[]);
    let column = text.lines().nth(2).unwrap().len();
    ran.expect_code(2)
        .expect_log(&host.manifest.display().to_string())
        .expect_log(&format!(
            "line 3, column {column}: trailing comma before ']'"
        ));
    assert_untouched(&host, text.as_bytes(), "trailing comma");
}

/// `init --api` with a URL the agent could never use writes nothing.
#[test]
fn init_refuses_a_bad_api_url_and_writes_nothing() {
    let dir = TempDir::new();
    let config = dir.join("etc/bin-proxy/bin-manifests.json");
    let ran = output(bare(&["init", "--api", "mgr:8081/api/v1", "--config"]).arg(&config));
    ran.expect_code(2);
    assert!(
        ran.stderr
            .contains("--api \"mgr:8081/api/v1\" must start with http:// or https://"),
        "{}",
        ran.stderr
    );
    assert!(
        !dir.join("etc").exists(),
        "init created {}",
        dir.join("etc").display()
    );
}

/// Addition to case 3: the most common "missing manifest" on a fresh host is a
/// missing /etc/bin-proxy directory (the agent was copied before `init`). The
/// operator named the manifest, so the error must name the manifest.
#[test]
fn missing_manifest_directory_error_names_the_manifest() {
    let dir = TempDir::new();
    let config = dir.join("etc/bin-proxy/bin-manifests.json");
    let ran = output(bare(&[]).arg("--config").arg(&config));
    eprintln!(
        "missing manifest directory: exit {}: {}",
        ran.code, ran.stderr
    );
    assert_eq!(
        ran.code, 2,
        "missing manifest directory: exit code\n{}",
        ran.stderr
    );
    let quoted = format!("\"{}\"", config.display());
    assert!(
        ran.stderr.contains(&quoted),
        "missing manifest directory: the error must name {quoted}\n{}",
        ran.stderr
    );
    assert!(!config.parent().unwrap().exists(), "nothing may be created");
}

// ---------------------------------------------------------------------------
// 4–5: check and status are read-only
// ---------------------------------------------------------------------------

#[test]
fn check_reports_each_binary_and_touches_nothing() {
    let host = Host::new();
    let (old_a, new_a, b) = (
        b"a old".to_vec(),
        b"a new build".to_vec(),
        b"b current".to_vec(),
    );
    let c = b"c fresh".to_vec();
    fs::write(host.target("a"), &old_a).unwrap();
    fs::write(host.target("b"), &b).unwrap();
    host.manifest_for(&[("a", &md5_hex(&old_a)), ("b", &md5_hex(&b)), ("c", "")]);
    host.server.publish("a", &new_a);
    host.server.publish("b", &b);
    host.server.publish("c", &c);
    let manifest = fs::read(&host.manifest).unwrap();
    let manifest_mtime = mtime(&host.manifest);
    let (a_mtime, b_mtime) = (mtime(&host.target("a")), mtime(&host.target("b")));
    let etc_before: Vec<_> = fs::read_dir(host.dir.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let ran = host.run(&["check"]);
    ran.expect_code(0);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "one line per binary\n{}", ran.stdout);
    let expect = |line: &str, prefix: &str, parts: &[&str]| {
        assert!(
            line.starts_with(prefix),
            "{line:?} should start with {prefix:?}"
        );
        for p in parts {
            assert!(line.contains(p), "{line:?} lacks {p:?}");
        }
    };
    expect(
        lines[0],
        "a: ",
        &[
            "would install",
            &short(&md5_hex(&old_a)),
            &short(&md5_hex(&new_a)),
        ],
    );
    expect(lines[1], "b: ", &["up to date", &short(&md5_hex(&b))]);
    expect(
        lines[2],
        "c: ",
        &["would install", &short(&md5_hex(&c)), "not installed"],
    );

    // Nothing but the three questions reached the server.
    assert_eq!(
        host.server.count("GET", "/api/v1/bins/"),
        3,
        "{:?}",
        host.server.requests()
    );
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
    assert_eq!(
        host.server.count("POST", "/"),
        0,
        "no POST of any kind: {:?}",
        host.server.requests()
    );
    assert_eq!(host.server.count("*", "/api/v1/keepalive"), 0);
    assert!(host.server.reported("a").is_empty() && host.server.registration(NODE).is_none());
    // Nothing on disk changed.
    assert_eq!(fs::read(&host.manifest).unwrap(), manifest);
    assert_eq!(mtime(&host.manifest), manifest_mtime);
    assert_eq!(fs::read(host.target("a")).unwrap(), old_a);
    assert_eq!(fs::read(host.target("b")).unwrap(), b);
    assert_eq!(
        (mtime(&host.target("a")), mtime(&host.target("b"))),
        (a_mtime, b_mtime)
    );
    assert!(!host.target("c").exists());
    assert!(!host.opt.join("a.bak").exists());
    assert!(temp_files(&host.opt).is_empty());
    assert!(
        !state_file(&host).exists(),
        "check must not create the state file"
    );
    assert!(
        !lock_file(&host).exists(),
        "check must not create the lock file"
    );
    let etc_after: Vec<_> = fs::read_dir(host.dir.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        etc_after, etc_before,
        "check created files beside the manifest"
    );
    assert!(
        supervisorctl_log(&host.dir.path).is_empty(),
        "check must not call supervisorctl"
    );
}

#[test]
fn status_prints_a_table_with_short_hashes_and_states() {
    let host = Host::new();
    let up = b"up build".to_vec();
    let (old, new) = (b"old build".to_vec(), b"new build".to_vec());
    let gone = b"gone build".to_vec();
    let fresh = b"fresh build".to_vec();
    let (orig, edited) = (b"orig build".to_vec(), b"edited by hand".to_vec());
    let broken = b"broken build".to_vec();
    fs::write(host.target("up"), &up).unwrap();
    fs::write(host.target("old"), &old).unwrap();
    fs::write(host.target("edited"), &edited).unwrap();
    fs::write(host.target("broken"), &broken).unwrap();
    host.manifest_for(&[
        ("up", &md5_hex(&up)),
        ("old", &md5_hex(&old)),
        ("gone", &md5_hex(&gone)),
        ("fresh", ""),
        ("edited", &md5_hex(&orig)),
        ("broken", &md5_hex(&broken)),
    ]);
    host.server.publish("up", &up);
    host.server.publish("old", &new);
    host.server.publish("gone", &gone);
    host.server.publish("fresh", &fresh);
    host.server.publish("edited", &orig);
    host.server.publish("broken", &broken);
    host.server.fault("broken", Fault::Status(500));
    let manifest = fs::read(&host.manifest).unwrap();

    let ran = host.run(&["status"]);
    eprintln!("--- stdout\n{}--- stderr\n{}", ran.stdout, ran.stderr);
    ran.expect_code(1);
    let rows: Vec<Vec<String>> = ran.stdout.lines().map(cells).collect();
    assert_eq!(
        rows.len(),
        7,
        "a header and one row per binary\n{}",
        ran.stdout
    );
    assert_eq!(
        rows[0],
        ["NAME", "PATH", "RECORDED", "ACTUAL", "REMOTE", "STATE"]
    );
    let path = |n: &str| host.target(n).display().to_string();
    let h = |b: &[u8]| short(&md5_hex(b));
    let expected: Vec<Vec<String>> = vec![
        vec![
            "up".into(),
            path("up"),
            h(&up),
            h(&up),
            h(&up),
            "up to date".into(),
        ],
        vec![
            "old".into(),
            path("old"),
            h(&old),
            h(&old),
            h(&new),
            "outdated".into(),
        ],
        vec![
            "gone".into(),
            path("gone"),
            h(&gone),
            "missing".into(),
            h(&gone),
            "missing".into(),
        ],
        vec![
            "fresh".into(),
            path("fresh"),
            "none".into(),
            "missing".into(),
            h(&fresh),
            "not installed".into(),
        ],
        vec![
            "edited".into(),
            path("edited"),
            h(&orig),
            h(&edited),
            h(&orig),
            "changed on disk".into(),
        ],
        vec![
            "broken".into(),
            path("broken"),
            h(&broken),
            h(&broken),
            "?".into(),
            "error".into(),
        ],
    ];
    for (row, want) in rows[1..].iter().zip(&expected) {
        assert_eq!(row, want, "\n{}", ran.stdout);
    }
    // Shortened: no full hash anywhere in the table.
    for b in [&up, &old, &new, &gone, &fresh, &orig, &edited, &broken] {
        assert!(
            !ran.stdout.contains(&md5_hex(b)),
            "full hash in the table\n{}",
            ran.stdout
        );
    }
    // Read-only, like check.
    assert_eq!(fs::read(&host.manifest).unwrap(), manifest);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);
    assert_eq!(host.server.count("POST", "/"), 0);
    assert!(!state_file(&host).exists() && !lock_file(&host).exists());
    assert!(supervisorctl_log(&host.dir.path).is_empty());
}

/// Addition to case 5: a row that says "error" must be explained somewhere —
/// the operator who runs `status` and gets exit 1 needs to know why.
#[test]
fn status_explains_why_a_row_says_error() {
    let host = Host::new();
    let app = b"steady build".to_vec();
    fs::write(host.target("broken"), &app).unwrap();
    host.manifest_for(&[("broken", &md5_hex(&app))]);
    host.server.publish("broken", &app);
    host.server.fault("broken", Fault::Status(500));

    let ran = host.run(&["status"]);
    eprintln!("--- stdout\n{}--- stderr\n{}", ran.stdout, ran.stderr);
    ran.expect_code(1);
    let all = format!("{}{}", ran.stdout, ran.stderr);
    assert!(
        all.contains("broken:") && all.contains("500"),
        "nothing says why \"broken\" is in error (expected its name and the server's 500)\n{all}"
    );
}

// ---------------------------------------------------------------------------
// 6: init
// ---------------------------------------------------------------------------

#[test]
fn init_writes_a_starter_manifest_once() {
    let host = Host::new();
    let config = host.dir.join("fresh/etc/bin-proxy/bin-manifests.json");
    assert!(!config.parent().unwrap().exists());
    let init = || {
        output(
            bare(&["init", "--config"])
                .arg(&config)
                .env("BIN_MANAGER_API", host.server.api())
                .env("PATH", path_with(&host.bin)),
        )
    };

    init().expect_code(0);
    let text = fs::read_to_string(&config).expect("init wrote the manifest");
    eprintln!("{text}");
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let uname = Command::new("uname").arg("-m").output().unwrap();
    let arch = String::from_utf8(uname.stdout).unwrap().trim().to_string();
    let field = |k: &str| common::json_string_field(&text, k);
    assert_eq!(
        field("name").as_deref(),
        Some(hostname.as_str()),
        "node name\n{text}"
    );
    assert_eq!(
        field("cpuArch").as_deref(),
        Some(arch.as_str()),
        "cpuArch\n{text}"
    );
    assert_eq!(
        field("proxyVersion").as_deref(),
        Some("1.0.0"),
        "proxyVersion\n{text}"
    );
    assert_eq!(
        field("api"),
        Some(host.server.api()),
        "BIN_MANAGER_API lands in manager.api\n{text}"
    );
    assert!(
        text.contains("\"binaries\": []"),
        "an empty binaries list\n{text}"
    );
    assert!(
        text.contains("\n  \"node\": {\n    \"name\": "),
        "pretty-printed with 2 spaces\n{text}"
    );

    // It is a manifest the agent accepts.
    output(
        bare(&["check", "--config"])
            .arg(&config)
            .env("BIN_MANAGER_API", host.server.api()),
    )
    .expect_code(0);

    // A second init refuses and leaves the file alone.
    let before = fs::read(&config).unwrap();
    let before_mtime = mtime(&config);
    let again = init();
    again.expect_code(1);
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    assert!(
        again.stderr.contains(&config.display().to_string()),
        "{}",
        again.stderr
    );
    assert_eq!(fs::read(&config).unwrap(), before);
    assert_eq!(mtime(&config), before_mtime);
    assert!(temp_files(config.parent().unwrap()).is_empty());
}

// ---------------------------------------------------------------------------
// 7–8: rollback and retry
// ---------------------------------------------------------------------------

#[test]
fn rollback_restores_holds_back_until_retry() {
    let (host, old, new) = upgradable_host();
    let original_manifest = host.manifest_text();
    host.run(&[]).expect_code(0).expect_log("myapp: upgraded");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
    assert_eq!(fs::read(host.opt.join("myapp.bak")).unwrap(), old);
    let ctl_before = supervisorctl_log(&host.dir.path).len();
    host.server.clear_requests();

    let ran = host.run(&["rollback", "myapp"]);
    eprintln!("rollback:\n{}", ran.stderr);
    ran.expect_code(0);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), old);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert!(
        !host.opt.join("myapp.bak").exists(),
        "the backup was put back, not copied"
    );
    assert_eq!(
        host.manifest_text(),
        original_manifest,
        "the manifest records the old hash again"
    );
    assert_eq!(
        host.server.reported("myapp").last(),
        Some(&md5_hex(&old)),
        "the old hash is reported"
    );
    assert_eq!(host.server.count("POST", "/api/v1/bins/myapp"), 1);
    let ctl: Vec<String> = supervisorctl_log(&host.dir.path)[ctl_before..].to_vec();
    assert!(
        ctl.iter().any(|l| l == "restart myapp"),
        "supervisorctl calls: {ctl:?}"
    );
    assert!(temp_files(&host.opt).is_empty());

    // The published build is held back by the next cron run.
    host.server.clear_requests();
    let ran = host.run(&[]);
    eprintln!("held back:\n{}", ran.stderr);
    ran.expect_code(0).expect_log("holding back");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), old);
    assert_eq!(host.server.count("GET", "/api/v1/download"), 0);

    // retry clears it; the next run installs the published build again.
    host.run(&["retry", "myapp"]).expect_code(0);
    assert_eq!(
        fs::read(host.target("myapp")).unwrap(),
        old,
        "retry itself installs nothing"
    );
    let ran = host.run(&[]);
    ran.expect_code(0).expect_log("myapp: upgraded");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 1);
    assert!(host.manifest_text().contains(&md5_hex(&new)));
    assert!(temp_files(&host.opt).is_empty());
}

#[test]
fn rollback_without_a_backup_or_of_an_unknown_name_fails() {
    let host = Host::new();
    let app = b"#!/bin/sh\necho current\n".to_vec();
    fs::write(host.target("myapp"), &app).unwrap();
    host.manifest_for(&[("myapp", &md5_hex(&app))]);
    host.server.publish("myapp", &app);
    let manifest = fs::read(&host.manifest).unwrap();
    let app_mtime = mtime(&host.target("myapp"));

    let ran = host.run(&["rollback", "myapp"]);
    ran.expect_code(1)
        .expect_log("no backup of myapp to roll back to")
        .expect_log(&host.opt.join("myapp.bak").display().to_string());
    assert_eq!(fs::read(host.target("myapp")).unwrap(), app);
    assert_eq!(mtime(&host.target("myapp")), app_mtime);
    assert_eq!(fs::read(&host.manifest).unwrap(), manifest);
    assert!(
        supervisorctl_log(&host.dir.path).is_empty(),
        "nothing to restart"
    );
    assert!(host.server.reported("myapp").is_empty());
    assert!(
        !state_file(&host).exists()
            || !fs::read_to_string(state_file(&host))
                .unwrap()
                .contains("rolled back")
    );

    let ran = host.run(&["rollback", "unknown"]);
    ran.expect_code(2)
        .expect_log("unknown")
        .expect_log(&host.manifest.display().to_string());
    assert_eq!(fs::read(host.target("myapp")).unwrap(), app);
    assert_eq!(fs::read(&host.manifest).unwrap(), manifest);
}

// ---------------------------------------------------------------------------
// 9: help, version, bad options
// ---------------------------------------------------------------------------

#[test]
fn help_version_and_unknown_options() {
    let ran = output(&mut bare(&["--help"]));
    ran.expect_code(0);
    let help = &ran.stdout;
    let mut wanted: Vec<String> = [
        "USAGE",
        "EXIT STATUS",
        "--config",
        "--api",
        "--download-url",
        "--timeout",
        "--splay",
        "--every",
        "--only",
        "--quiet",
        "--verbose",
        "--max-size",
        "BIN_MANAGER_API",
        "BIN_DOWNLOAD_URL",
        "BIN_PROXY_CONFIG",
        "BIN_MANAGER_TOKEN",
    ]
    .map(String::from)
    .to_vec();
    // Every long option the parser knows, so that a new one cannot go undocumented.
    let cli = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli.rs")).unwrap();
    let agent_parser =
        &cli[cli.find("pub fn parse(").unwrap()..cli.find("pub fn parse_manager(").unwrap()];
    for piece in agent_parser.split("Long(\"").skip(1) {
        if let Some(end) = piece.find('"') {
            wanted.push(format!("--{}", &piece[..end]));
        }
    }
    assert!(wanted.len() > 16, "found the parser's options: {wanted:?}");
    for w in &wanted {
        assert!(help.contains(w.as_str()), "--help lacks {w:?}\n{help}");
    }
    assert!(
        ran.stderr.is_empty(),
        "help goes to stdout only: {}",
        ran.stderr
    );

    let ran = output(&mut bare(&["--version"]));
    ran.expect_code(0);
    assert_eq!(ran.stdout.trim(), "bin-proxy 1.0.0");

    let ran = output(&mut bare(&["--bogus"]));
    ran.expect_code(2);
    assert!(ran.stderr.contains("invalid option"), "{}", ran.stderr);
    assert!(ran.stderr.contains("--bogus"), "{}", ran.stderr);
    assert!(ran.stdout.is_empty());
}

// ---------------------------------------------------------------------------
// 10: precedence
// ---------------------------------------------------------------------------

#[test]
fn api_flag_beats_env_beats_manifest() {
    let host = Host::new(); // host.server is the BIN_MANAGER_API server
    let (flag, manifest) = (Server::start(), Server::start());
    let app = b"#!/bin/sh\necho steady\n".to_vec();
    fs::write(host.target("myapp"), &app).unwrap();
    for s in [&host.server, &flag, &manifest] {
        s.publish("myapp", &app);
    }
    write_manifest(
        &host,
        &format!("\"api\": \"{}\"", manifest.api()),
        &[entry(&host, "myapp", &md5_hex(&app), "")],
    );
    let clear = || {
        for s in [&host.server, &flag, &manifest] {
            s.clear_requests();
        }
    };
    let asked = |s: &Server| s.count("GET", "/api/v1/bins/myapp");

    output(
        host.command(&["--api", &flag.api()])
            .env("BIN_MANAGER_API", host.server.api()),
    )
    .expect_code(0);
    assert_eq!(
        (asked(&flag), asked(&host.server), asked(&manifest)),
        (1, 0, 0),
        "--api wins"
    );
    assert!(host.server.requests().is_empty() && manifest.requests().is_empty());
    assert!(flag.count("GET", "/api/v1/keepalive") >= 1);

    clear();
    output(&mut host.command(&[])).expect_code(0);
    assert_eq!(
        (asked(&flag), asked(&host.server), asked(&manifest)),
        (0, 1, 0),
        "BIN_MANAGER_API beats the manifest"
    );
    assert!(flag.requests().is_empty() && manifest.requests().is_empty());

    clear();
    output(host.command(&[]).env_remove("BIN_MANAGER_API")).expect_code(0);
    assert_eq!(
        (asked(&flag), asked(&host.server), asked(&manifest)),
        (0, 0, 1),
        "manager.api is used last"
    );
    assert!(flag.requests().is_empty() && host.server.requests().is_empty());
}

#[test]
fn bin_proxy_config_env_names_the_manifest_when_no_flag_does() {
    let (host, _old, new) = upgradable_host();
    let ran = output(
        bare(&[])
            .env("BIN_PROXY_CONFIG", &host.manifest)
            .env("BIN_MANAGER_API", host.server.api())
            .env("PATH", path_with(&host.bin)),
    );
    ran.expect_code(0);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
    assert!(host.manifest_text().contains(&md5_hex(&new)));
    assert_eq!(host.server.count("GET", "/api/v1/download/myapp"), 1);

    // --config wins over the environment.
    host.server.clear_requests();
    let ran = output(
        bare(&["--config"])
            .arg(&host.manifest)
            .env("BIN_PROXY_CONFIG", host.dir.join("nowhere/else.json"))
            .env("BIN_MANAGER_API", host.server.api())
            .env("PATH", path_with(&host.bin)),
    );
    ran.expect_code(0);
    assert_eq!(host.server.count("GET", "/api/v1/bins/myapp"), 1);
}

#[test]
fn download_location_follows_flag_env_manifest_and_binary() {
    // Each case: (label, manager members, per-binary extra, flag, env) → which
    // server must serve the download, and at which path.
    let d1 = Server::start();
    let d2 = Server::start();
    let d3 = Server::start();
    let d4 = Server::start();
    let base = |s: &Server| format!("{}/download", s.api());
    struct Case<'a> {
        label: &'a str,
        manager: String,
        extra: String,
        flag: Option<String>,
        env: Option<String>,
        server: &'a Server,
        path: &'a str,
    }
    let cases = [
        Case {
            label: "--download-url",
            manager: format!("\"downloadUrl\": \"{}\"", base(&d3)),
            extra: String::new(),
            flag: Some(base(&d1)),
            env: Some(base(&d2)),
            server: &d1,
            path: "/api/v1/download/myapp",
        },
        Case {
            label: "BIN_DOWNLOAD_URL",
            manager: format!("\"downloadUrl\": \"{}\"", base(&d3)),
            extra: String::new(),
            flag: None,
            env: Some(base(&d2)),
            server: &d2,
            path: "/api/v1/download/myapp",
        },
        Case {
            label: "manager.downloadUrl",
            manager: format!("\"downloadUrl\": \"{}\"", base(&d3)),
            extra: String::new(),
            flag: None,
            env: None,
            server: &d3,
            path: "/api/v1/download/myapp",
        },
        Case {
            label: "the binary's downloadUrl",
            manager: format!("\"downloadUrl\": \"{}\"", base(&d3)),
            extra: format!(",\n      \"downloadUrl\": \"{}/myapp-cdn\"", base(&d4)),
            flag: None,
            env: None,
            server: &d4,
            path: "/api/v1/download/myapp-cdn",
        },
    ];
    for case in &cases {
        let (host, old, new) = upgradable_host();
        for s in [&d1, &d2, &d3, &d4] {
            s.clear_requests();
            s.publish("myapp", &new);
        }
        d4.publish("myapp-cdn", &new);
        write_manifest(
            &host,
            &case.manager,
            &[entry(&host, "myapp", &md5_hex(&old), &case.extra)],
        );
        let mut cmd = host.command(&[]);
        if let Some(flag) = &case.flag {
            cmd.arg("--download-url").arg(flag);
        }
        if let Some(env) = &case.env {
            cmd.env("BIN_DOWNLOAD_URL", env);
        }
        let ran = output(&mut cmd);
        assert_eq!(ran.code, 0, "{}: exit code\n{}", case.label, ran.stderr);
        assert_eq!(
            fs::read(host.target("myapp")).unwrap(),
            new,
            "{}",
            case.label
        );
        assert_eq!(
            case.server.count("GET", case.path),
            1,
            "{}: {:?}",
            case.label,
            case.server.requests()
        );
        for s in [&host.server, &d1, &d2, &d3, &d4] {
            let want = if std::ptr::eq(s, case.server) { 1 } else { 0 };
            assert_eq!(
                s.count("GET", "/api/v1/download/"),
                want,
                "{}: downloads at {}",
                case.label,
                s.url()
            );
        }
        // The API itself stays where BIN_MANAGER_API says.
        assert_eq!(
            host.server.count("GET", "/api/v1/bins/myapp"),
            1,
            "{}",
            case.label
        );
        assert!(temp_files(&host.opt).is_empty());
    }
}

// ---------------------------------------------------------------------------
// 11–12: loop mode and splay
// ---------------------------------------------------------------------------

#[test]
fn every_keeps_running_and_checks_again() {
    let (host, _old, new) = upgradable_host();
    let log = host.dir.join("every.stderr");
    let mut cmd = host.command(&["--every", "1"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = Reaper(cmd.spawn().expect("spawn bin-proxy --every 1"));

    let saw_two = wait_until(Duration::from_secs(30), || {
        host.server.count("GET", "/api/v1/bins/myapp") >= 2
    });
    let still_running = child.0.try_wait().expect("try_wait").is_none();
    let stderr = fs::read_to_string(&log).unwrap_or_default();
    assert!(saw_two, "fewer than 2 GET bins in 30 s\n{stderr}");
    assert!(still_running, "--every exited on its own\n{stderr}");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // The first pass upgraded; the later ones found it up to date.
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
    assert_eq!(
        host.server.count("GET", "/api/v1/download/myapp"),
        1,
        "{stderr}"
    );
}

/// `kill -SIG PID`.
fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Waits (bounded) for the child to exit; its exit code.
fn exit_code_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let mut code = None;
    wait_until(limit, || match child.try_wait() {
        Ok(Some(status)) => {
            code = Some(status.code().unwrap_or(-1));
            true
        }
        _ => false,
    });
    code
}

/// `--every` (containers, where `docker stop` sends SIGTERM) stops on
/// SIGTERM or SIGINT: a download in progress is abandoned — nothing is
/// swapped, no temp file stays — one line says so, exit 0. Between runs it
/// stops at once.
#[test]
fn every_stops_on_sigterm_without_a_half_done_step() {
    let (host, old, _new) = upgradable_host();
    // A download that would take days: only abandoning it lets the agent stop.
    host.server.publish("myapp", &vec![b'x'; 1 << 20]);
    host.server
        .fault("myapp", Fault::SlowDownload(Duration::from_millis(200)));
    let log = host.dir.join("every.stderr");
    let mut cmd = host.command(&["--every", "60"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = Reaper(cmd.spawn().expect("spawn bin-proxy --every 60"));
    let downloading = wait_until(Duration::from_secs(30), || {
        host.server.count("GET", "/api/v1/download/myapp") >= 1 && !temp_files(&host.opt).is_empty()
    });
    assert!(
        downloading,
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    signal(&child.0, "TERM");
    let code = exit_code_within(&mut child.0, Duration::from_secs(20));
    let stderr = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("SIGTERM")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("INFO received SIGTERM: stopping; no step was left half done"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ERROR myapp"),
        "the abandoned download is not a failure:\n{stderr}"
    );
    assert_eq!(fs::read(host.target("myapp")).unwrap(), old, "{stderr}");
    assert!(!host.opt.join("myapp.bak").exists());
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );

    // Between runs: SIGINT ends the wait at once.
    let (host, _old, new) = upgradable_host();
    let log = host.dir.join("every.stderr");
    let mut cmd = host.command(&["--every", "600"]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    let mut child = Reaper(cmd.spawn().expect("spawn bin-proxy --every 600"));
    let ran = wait_until(Duration::from_secs(30), || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("1 changed"))
    });
    assert!(ran, "{}", fs::read_to_string(&log).unwrap_or_default());
    signal(&child.0, "INT");
    assert_eq!(
        exit_code_within(&mut child.0, Duration::from_secs(10)),
        Some(0)
    );
    let stderr = fs::read_to_string(&log).unwrap_or_default();
    assert!(stderr.contains("received SIGINT: stopping"), "{stderr}");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
}

#[test]
fn splay_waits_the_nodes_fixed_share_then_runs() {
    let (host, _old, new) = upgradable_host();
    // The wait is md5(node name)'s first 48 bits mod (SECS + 1): fixed per
    // node. For the test node and --splay 2 that is 2 s, so an ignored
    // --splay (no wait) fails here.
    let max = 2;
    let secs = u64::from_str_radix(&md5_hex(NODE.as_bytes())[..12], 16).unwrap() % (max + 1);
    assert!(secs > 0, "pick a --splay whose wait for {NODE} is not 0");
    let started = std::time::Instant::now();
    let ran = run_bounded(
        host.command(&["--splay", &max.to_string(), "--verbose"]),
        &host.dir.path,
        Duration::from_secs(60),
    );
    let took = started.elapsed();
    ran.expect_code(0);
    assert!(
        ran.stderr
            .contains(&format!("waiting {secs} s before starting")),
        "{}",
        ran.stderr
    );
    assert!(
        took >= Duration::from_secs(secs),
        "took {took:?}, splay {secs} s"
    );
    assert_eq!(fs::read(host.target("myapp")).unwrap(), new);
}

// ---------------------------------------------------------------------------
// 13–14: log format, manifest rewrite
// ---------------------------------------------------------------------------

#[test]
fn log_lines_are_timestamped_leveled_and_hashes_short() {
    let (host, old, new) = upgradable_host();
    let ran = host.run(&[]);
    ran.expect_code(0);
    eprintln!("{}", ran.stderr);
    assert!(!ran.stderr.is_empty());
    for line in ran.stderr.lines() {
        assert!(
            well_formed_log_line(line),
            "not `YYYY-MM-DDTHH:MM:SSZ LEVEL …`: {line:?}"
        );
    }
    let (old_md5, new_md5) = (md5_hex(&old), md5_hex(&new));
    assert!(
        !ran.stderr.contains(&new_md5),
        "full new hash in the log\n{}",
        ran.stderr
    );
    assert!(
        !ran.stderr.contains(&old_md5),
        "full old hash in the log\n{}",
        ran.stderr
    );
    ran.expect_log(&format!(
        "myapp: upgraded {}→{}",
        short(&old_md5),
        short(&new_md5)
    ));
}

/// `--log-format json` (or `BIN_PROXY_LOG_FORMAT=json`): one object per
/// line with exactly ts, level, binary, event, from, to, msg; the hashes in
/// full. Text from outside stays on its line in both formats.
#[test]
fn json_logs_are_one_object_per_line_with_the_events_fields() {
    let (host, old, new) = upgradable_host();
    let ran = host.run(&["--log-format", "json"]);
    ran.expect_code(0);
    let lines: Vec<Json> = ran
        .stderr
        .lines()
        .map(|l| common::json::try_parse(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{}", ran.stderr);
    for l in &lines {
        assert_eq!(
            l.keys(),
            ["ts", "level", "binary", "event", "from", "to", "msg"],
            "{l:?}"
        );
        assert!(well_formed_log_line(&format!("{} INFO x", l.get("ts").s())));
    }
    let upgraded = lines
        .iter()
        .find(|l| l.get("event").as_str() == Some("upgraded"))
        .unwrap_or_else(|| panic!("no upgraded event:\n{}", ran.stderr));
    assert_eq!(upgraded.get("level").s(), "info");
    assert_eq!(upgraded.get("binary").s(), "myapp");
    assert_eq!(upgraded.get("from").s(), md5_hex(&old));
    assert_eq!(upgraded.get("to").s(), md5_hex(&new));
    assert!(
        upgraded.get("msg").s().starts_with("upgraded "),
        "{upgraded:?}"
    );
    let summary = lines.last().unwrap();
    assert_eq!(summary.get("event").s(), "summary");
    assert_eq!(summary.get("binary"), &Json::Null);

    // The environment variable, a failure, and a server message with a
    // newline and an escape sequence in it.
    let host = Host::new();
    host.manifest_for(&[("myapp", "")]);
    host.server.publish("myapp", &new);
    host.server.fault(
        "myapp",
        Fault::EnvelopeCode(1, "no\nFAKE LINE \x1b[31mred".into()),
    );
    let ran = output(host.command(&[]).env("BIN_PROXY_LOG_FORMAT", "json"));
    ran.expect_code(1);
    let failed = ran
        .stderr
        .lines()
        .map(common::json::parse)
        .find(|l| l.get("event").as_str() == Some("failed"))
        .unwrap_or_else(|| panic!("no failed event:\n{}", ran.stderr));
    assert_eq!(failed.get("level").s(), "error");
    assert_eq!(failed.get("binary").s(), "myapp");
    assert!(
        failed.get("msg").s().contains("no\nFAKE LINE \x1b[31mred"),
        "{failed:?}"
    );
    assert!(
        !ran.stderr.lines().any(|l| l.starts_with("FAKE")),
        "{}",
        ran.stderr
    );
    let ran = host.run(&[]);
    assert!(
        ran.stderr.contains("no\\nFAKE LINE \\x1b[31mred"),
        "text escapes control characters:\n{}",
        ran.stderr
    );
    assert!(
        !ran.stderr.lines().any(|l| l.starts_with("FAKE")),
        "{}",
        ran.stderr
    );

    let ran = output(&mut host.command(&["--log-format", "xml"]));
    ran.expect_code(2);
    assert!(
        ran.stderr
            .contains("--log-format takes text or json, not \"xml\""),
        "{}",
        ran.stderr
    );
}

#[test]
fn manifest_keeps_its_mode_and_pretty_format() {
    let (host, old, new) = upgradable_host();
    fs::set_permissions(&host.manifest, fs::Permissions::from_mode(0o600)).unwrap();
    let before = host.manifest_text();

    host.run(&[]).expect_code(0).expect_log("myapp: upgraded");
    assert_eq!(mode(&host.manifest), 0o600);
    let after = host.manifest_text();
    // The same 2-space layout, only the hash changed.
    assert_eq!(after, before.replace(&md5_hex(&old), &md5_hex(&new)));
    assert!(
        after.contains("\n  \"binaries\": [\n    {\n      \"name\": \"myapp\",\n"),
        "{after}"
    );
    for line in after.lines() {
        let indent = line.len() - line.trim_start().len();
        assert!(
            indent % 2 == 0 && !line.starts_with('\t'),
            "indentation of {line:?}"
        );
    }
    assert!(temp_files(&host.dir.join("etc")).is_empty());
}
