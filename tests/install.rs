//! scripts/install.sh, run for real with `--root` pointing at a temp dir, so the
//! real system is never touched.

use testkit as common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh");
const BIN: &str = env!("CARGO_BIN_EXE_bin-proxy");
const LOG: &str = "/var/log/bin-proxy.log";

/// A unique directory under the system temp dir, removed on drop.
struct Root(PathBuf);

impl Root {
    fn new() -> Root {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bin-proxy-install-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {}", path.display(), e));
        Root(path)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel.trim_start_matches('/'))
    }

    fn manifest(&self) -> PathBuf {
        self.path("etc/bin-proxy/bin-manifests.json")
    }

    fn cron(&self) -> PathBuf {
        self.path("etc/cron.d/bin-proxy")
    }

    fn logrotate(&self) -> PathBuf {
        self.path("etc/logrotate.d/bin-proxy")
    }

    /// Runs the script with `--root ROOT` plus `args`.
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("bash")
            .arg(SCRIPT)
            .arg("--root")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("run bash scripts/install.sh");
        eprintln!(
            "install.sh {:?}: {}\nstdout:\n{}stderr:\n{}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Installs with the freshly built agent plus `args`; asserts success.
    fn install(&self, args: &[&str]) -> String {
        let mut all = vec!["--binary", BIN];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_eq!(out.status.code(), Some(0), "install failed");
        assert!(out.stderr.is_empty(), "install wrote to stderr");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Every file and directory under the root: relative path → (mode, bytes).
    fn snapshot(&self) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
        fn walk(base: &Path, dir: &Path, into: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
            for entry in fs::read_dir(dir).unwrap() {
                let p = entry.unwrap().path();
                let meta = fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(base).unwrap().to_path_buf();
                let bytes = if meta.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                into.insert(rel, (meta.permissions().mode() & 0o7777, bytes));
                if meta.is_dir() {
                    walk(base, &p, into);
                }
            }
        }
        let mut map = BTreeMap::new();
        walk(&self.0, &self.0, &mut map);
        map
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {}", p.display(), e))
        .permissions()
        .mode()
        & 0o7777
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {}", p.display(), e))
}

/// The cron.d file's job lines: neither comments, blank, nor `VAR=value`.
fn cron_jobs(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| {
            let first = l.split_whitespace().next().unwrap_or("");
            !first.contains('=')
        })
        .map(String::from)
        .collect()
}

fn assert_cron(root: &Root, bin_path: &str) {
    let cron = root.cron();
    assert_eq!(mode(&cron), 0o644, "cron.d file mode");
    let text = read(&cron);
    assert!(
        text.starts_with('#'),
        "cron.d file has a comment header:\n{text}"
    );
    assert!(text.ends_with('\n'), "cron needs the last line terminated");
    assert_eq!(
        cron_jobs(&text),
        vec![format!("* * * * * root {bin_path} >> {LOG} 2>&1")],
        "cron.d file:\n{text}"
    );
}

/// No temp files (`.bin-proxy.XXXXXX`) left beside what was written.
fn assert_no_temp_files(root: &Root) {
    for (path, _) in root.snapshot() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.'),
            "leftover temp file {}",
            path.display()
        );
    }
}

/// `bin-proxy status` parses the manifest; with no binaries it contacts no server.
fn assert_status_ok(agent: &Path, manifest: &Path) {
    let out = common::without_proxies(&mut Command::new(agent))
        .arg("status")
        .arg("--config")
        .arg(manifest)
        .args(["--api", "http://127.0.0.1:9/api/v1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "status: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the header:\n{stdout}");
    assert!(lines[0].starts_with("NAME"), "header:\n{stdout}");
}

/// Replaces the value of the first `"name": "…"` (the node's: a starter
/// manifest has no binaries) with `new`.
fn set_node_name(manifest: &Path, new: &str) {
    let text = read(manifest);
    let key = text.find("\"name\"").expect("node name in manifest");
    let open = key + text[key + 6..].find('"').unwrap() + 6;
    let close = open + 1 + text[open + 1..].find('"').unwrap();
    let edited = format!("{}\"{}\"{}", &text[..open], new, &text[close + 1..]);
    fs::write(manifest, edited).unwrap();
}

#[test]
fn fresh_install() {
    let root = Root::new();
    let stdout = root.install(&[]);

    let agent = root.path("usr/local/bin/bin-proxy");
    assert_eq!(mode(&agent), 0o755);
    assert_eq!(fs::read(&agent).unwrap(), fs::read(BIN).unwrap());
    assert!(
        stdout.contains(&format!(
            "installed {} (bin-proxy {})",
            agent.display(),
            env!("CARGO_PKG_VERSION")
        )),
        "{stdout}"
    );

    assert_eq!(mode(&root.path("etc/bin-proxy")), 0o755);
    let manifest = root.manifest();
    assert!(manifest.is_file());
    assert!(read(&manifest).contains("\"binaries\": []"));
    assert_status_ok(&agent, &manifest);

    assert_cron(&root, "/usr/local/bin/bin-proxy");

    let logrotate = root.logrotate();
    assert_eq!(mode(&logrotate), 0o644);
    let text = read(&logrotate);
    assert!(text.contains(&format!("{LOG} {{")), "{text}");
    for directive in [
        "weekly",
        "rotate 8",
        "compress",
        "missingok",
        "notifempty",
        "copytruncate",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == directive),
            "logrotate lacks {directive}:\n{text}"
        );
    }
    assert_no_temp_files(&root);
}

#[test]
fn install_twice_changes_nothing_and_keeps_the_manifest() {
    let root = Root::new();
    root.install(&[]);
    let manifest = root.manifest();
    set_node_name(&manifest, "operator-edited-marker");
    let edited = fs::read(&manifest).unwrap();
    let before = root.snapshot();

    let stdout = root.install(&["--api", "http://other:1/api/v1"]);
    assert!(stdout.contains("kept existing manifest"), "{stdout}");

    assert_eq!(fs::read(&manifest).unwrap(), edited, "manifest overwritten");
    assert!(read(&manifest).contains("\"operator-edited-marker\""));
    assert!(!read(&manifest).contains("other:1"));
    let after = root.snapshot();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "same set of files"
    );
    assert!(before == after, "same modes and contents");
    assert_cron(&root, "/usr/local/bin/bin-proxy");
    assert_status_ok(&root.path("usr/local/bin/bin-proxy"), &manifest);
    assert_no_temp_files(&root);
}

#[test]
fn prefix_moves_the_binary_and_the_cron_line() {
    let root = Root::new();
    root.install(&["--prefix", "/opt/bp"]);
    let agent = root.path("opt/bp/bin/bin-proxy");
    assert_eq!(mode(&agent), 0o755);
    assert_eq!(fs::read(&agent).unwrap(), fs::read(BIN).unwrap());
    assert!(!root.path("usr/local/bin/bin-proxy").exists());
    assert_cron(&root, "/opt/bp/bin/bin-proxy");
    assert_status_ok(&agent, &root.manifest());
}

#[test]
fn api_lands_in_the_starter_manifest() {
    let root = Root::new();
    root.install(&["--api", "http://mgr:8081/api/v1"]);
    let text: String = read(&root.manifest())
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let manager = &text[text.find("\"manager\":{").expect("manager object")..];
    let manager = &manager[..manager.find('}').unwrap()];
    assert!(
        manager.contains("\"api\":\"http://mgr:8081/api/v1\""),
        "manager.api: {manager}"
    );
}

#[test]
fn uninstall_removes_all_but_the_operators_data() {
    let root = Root::new();
    root.install(&[]);
    let manifest = root.manifest();
    let manifest_bytes = fs::read(&manifest).unwrap();

    for _ in 0..2 {
        let out = root.run(&["--uninstall"]);
        assert_eq!(out.status.code(), Some(0));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("kept {}", root.path("etc/bin-proxy").display())),
            "{stdout}"
        );
        assert!(!root.path("usr/local/bin/bin-proxy").exists());
        assert!(!root.cron().exists());
        assert!(!root.logrotate().exists());
        assert_eq!(fs::read(&manifest).unwrap(), manifest_bytes);
    }
}

#[test]
fn missing_binary_fails_and_creates_nothing() {
    let root = Root::new();
    let missing = root.path("no/such/bin-proxy");
    let missing = missing.to_str().unwrap();
    let out = root.run(&["--binary", missing]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(missing), "stderr names the path: {stderr}");
    assert!(root.snapshot().is_empty(), "created {:?}", root.snapshot());
}

#[test]
fn refuses_an_executable_that_is_not_the_agent() {
    let root = Root::new();
    let out = root.run(&["--binary", env!("CARGO_BIN_EXE_bin-manager")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not the bin-proxy agent"), "{stderr}");
    assert!(root.snapshot().is_empty(), "created {:?}", root.snapshot());
}

#[test]
fn a_bad_api_url_is_refused_before_anything_is_written() {
    let root = Root::new();
    let out = root.run(&["--binary", BIN, "--api", "mgr:8081/api/v1"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--api \"mgr:8081/api/v1\" must start with http:// or https://"),
        "{stderr}"
    );
    assert!(root.snapshot().is_empty(), "created {:?}", root.snapshot());
}

/// `systemd-analyze verify` of the units under `root` (the system's own
/// targets copied in, so that the units' default dependencies resolve and
/// `ExecStart` is looked up inside `root`). `None`: cannot verify here.
fn systemd_verify(root: &Root, units: &[PathBuf]) -> Option<Output> {
    let analyze = "/usr/bin/systemd-analyze";
    let have = common::ensure_debian_packages("systemd", analyze);
    if !common::can_run(
        have,
        "systemd-analyze is not installed and could not be (Debian package systemd)",
    ) {
        return None;
    }
    let lib = root.path("usr/lib/systemd/system");
    fs::create_dir_all(&lib).unwrap();
    for entry in fs::read_dir("/usr/lib/systemd/system").unwrap().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".target") {
            if let Ok(bytes) = fs::read(entry.path()) {
                fs::write(lib.join(&name), bytes).unwrap();
            }
        }
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.0.display()))
        .args(units)
        .output()
        .unwrap();
    eprintln!(
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out)
}

#[test]
fn systemd_timer_instead_of_cron_verifies_and_uninstalls() {
    let root = Root::new();
    // An earlier cron install: the timer replaces it.
    root.install(&[]);
    assert!(root.cron().exists());
    let stdout = root.install(&["--systemd"]);
    let service = root.path("etc/systemd/system/bin-proxy.service");
    let timer = root.path("etc/systemd/system/bin-proxy.timer");
    let link = root.path("etc/systemd/system/timers.target.wants/bin-proxy.timer");
    assert!(stdout.contains("removed"), "{stdout}");
    assert!(!root.cron().exists(), "scheduled twice");
    assert_eq!((mode(&service), mode(&timer)), (0o644, 0o644));
    let unit = read(&service);
    for line in ["Type=oneshot", "ExecStart=/usr/local/bin/bin-proxy"] {
        assert!(
            unit.lines().any(|l| l == line),
            "service lacks {line}:\n{unit}"
        );
    }
    let t = read(&timer);
    for line in [
        "OnCalendar=minutely",
        "RandomizedDelaySec=50s",
        "FixedRandomDelay=true",
        "WantedBy=timers.target",
    ] {
        assert!(t.lines().any(|l| l == line), "timer lacks {line}:\n{t}");
    }
    assert_eq!(
        fs::read_link(&link).unwrap(),
        PathBuf::from("/etc/systemd/system/bin-proxy.timer"),
        "the timer is enabled"
    );
    assert!(root.manifest().is_file());
    assert_no_temp_files(&root);

    if let Some(out) = systemd_verify(&root, &[service.clone(), timer.clone()]) {
        assert_eq!(out.status.code(), Some(0), "systemd-analyze verify");
        // It does catch mistakes: a timer without a schedule.
        let broken = root.path("etc/systemd/system/broken.timer");
        fs::write(
            &broken,
            t.replace("OnCalendar=minutely", "OnCalendar=bogus"),
        )
        .unwrap();
        let out = systemd_verify(&root, std::slice::from_ref(&broken)).unwrap();
        assert_ne!(out.status.code(), Some(0), "a bogus timer verifies");
        fs::remove_file(&broken).unwrap();
    }

    let out = root.run(&["--uninstall"]);
    assert_eq!(out.status.code(), Some(0));
    for p in [&service, &timer, &link] {
        assert!(
            !p.exists() && fs::symlink_metadata(p).is_err(),
            "{} left",
            p.display()
        );
    }
    assert!(root.manifest().is_file(), "the operator's manifest is kept");
}
