//! A simulated managed host for agent tests: a temp dir holding the manifest,
//! the target directory and a fake supervisorctl on PATH, the recording test
//! server, and a way to run the real `bin-proxy` executable against them.

use super::{fake_supervisorctl, path_with, temp_files, Server, TempDir};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The node name every test manifest uses.
pub const NODE: &str = "test-node";

/// What one `bin-proxy` invocation did.
pub struct Ran {
    /// Exit code.
    pub code: i32,
    /// stdout.
    pub stdout: String,
    /// stderr (the log).
    pub stderr: String,
}

/// What a command did, from its output (exit code -1 when killed by a signal).
impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Ran {
    /// Runs a prepared command to completion.
    pub fn from_command(cmd: &mut Command) -> Ran {
        Ran::from(cmd.output().expect("run bin-proxy"))
    }

    /// Runs a prepared command (stdin closed, output captured) for at most
    /// `timeout`; kills it and panics, naming `what`, when it takes longer.
    pub fn bounded(cmd: &mut Command, timeout: Duration, what: &str) -> Ran {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let drain = |mut r: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout pipe")));
        let err = drain(Box::new(child.stderr.take().expect("stderr pipe")));
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        Ran {
            code,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }

    /// Panics with the whole log unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Ran {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the log contains `text`.
    pub fn expect_log(&self, text: &str) -> &Ran {
        assert!(
            self.stderr.contains(text),
            "log lacks {text:?}\n--- stderr\n{}",
            self.stderr
        );
        self
    }
}

/// A managed host.
pub struct Host {
    /// Everything lives here.
    pub dir: TempDir,
    /// The recording bin-manager imitation.
    pub server: Server,
    /// The manifest path (`dir/etc/bin-manifests.json`).
    pub manifest: PathBuf,
    /// Where managed binaries live (`dir/opt`).
    pub opt: PathBuf,
    /// Directory with the fake supervisorctl.
    pub bin: PathBuf,
}

impl Default for Host {
    fn default() -> Host {
        Host::new()
    }
}

impl Host {
    /// A new host with an empty target dir and a running server.
    pub fn new() -> Host {
        let dir = TempDir::new();
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::create_dir_all(dir.join("opt")).unwrap();
        let bin = fake_supervisorctl(&dir.path);
        Host {
            manifest: dir.join("etc/bin-manifests.json"),
            opt: dir.join("opt"),
            bin,
            server: Server::start(),
            dir,
        }
    }

    /// Path of a managed binary.
    pub fn target(&self, name: &str) -> PathBuf {
        self.opt.join(name)
    }

    /// Writes the manifest text as is.
    pub fn write_manifest(&self, text: &str) {
        fs::write(&self.manifest, text).unwrap();
    }

    /// Writes a seed-format manifest managing `(name, recorded hash)` pairs at `opt/NAME`.
    pub fn manifest_for(&self, bins: &[(&str, &str)]) {
        let entries: Vec<String> = bins
            .iter()
            .map(|(name, hash)| {
                format!(
                    "    {{\n      \"name\": \"{name}\",\n      \"version\": \"latest\",\n      \"hash\": \"{hash}\",\n      \"path\": \"{}\"\n    }}",
                    self.target(name).display()
                )
            })
            .collect();
        self.write_manifest(&format!(
            "{{\n  \"node\": {{\n    \"name\": \"{NODE}\",\n    \"cpuArch\": \"x86_64\",\n    \"osRelease\": \"Test OS 1\",\n    \"proxyVersion\": \"1.0.0\"\n  }},\n  \"binaries\": [\n{}\n  ]\n}}\n",
            entries.join(",\n")
        ));
    }

    /// The manifest as it is now.
    pub fn manifest_text(&self) -> String {
        fs::read_to_string(&self.manifest).unwrap()
    }

    /// A `bin-proxy` command set up for this host: `--config`, the API in
    /// `BIN_MANAGER_API`, the fake supervisorctl first on PATH, no inherited
    /// settings (nor proxies).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(super::bin("bin-proxy"));
        cmd.args(args)
            .arg("--config")
            .arg(&self.manifest)
            .env("BIN_MANAGER_API", self.server.api())
            .env("PATH", path_with(&self.bin))
            .env_remove("BIN_PROXY_CONFIG")
            .env_remove("BIN_DOWNLOAD_URL")
            .env_remove("BIN_MANAGER_TOKEN")
            .env_remove("BIN_PROXY_SUPERVISORCTL");
        super::without_proxies(&mut cmd);
        cmd
    }

    /// Runs `bin-proxy ARGS --config MANIFEST` to completion.
    pub fn run(&self, args: &[&str]) -> Ran {
        Ran::from(self.command(args).output().expect("run bin-proxy"))
    }
}

/// Puts `bytes` at `opt/NAME` with `file_mode`.
pub fn install_file(host: &Host, name: &str, bytes: &[u8], file_mode: u32) {
    let path = host.target(name);
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(file_mode)).unwrap();
}

/// Everything a failed run must leave alone: the manifest's bytes and every
/// entry of the target dir (name → bytes, mode).
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    manifest: Vec<u8>,
    opt: BTreeMap<String, (Vec<u8>, u32)>,
}

/// The host's manifest and target dir as they are now.
pub fn snapshot(host: &Host) -> Snapshot {
    let opt = fs::read_dir(&host.opt)
        .unwrap()
        .flatten()
        .map(|e| {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap().permissions().mode() & 0o7777;
            (
                e.file_name().to_string_lossy().into_owned(),
                (fs::read(&p).unwrap_or_default(), m),
            )
        })
        .collect();
    Snapshot {
        manifest: fs::read(&host.manifest).unwrap(),
        opt,
    }
}

/// Panics unless the manifest and target dir are as in `before` and no temp
/// file was left.
pub fn assert_unchanged(host: &Host, before: &Snapshot, ran: &Ran) {
    let after = snapshot(host);
    assert!(
        after == *before,
        "the run changed files\nbefore: {:?}\nafter:  {:?}\n--- stderr\n{}",
        before.opt.keys().collect::<Vec<_>>(),
        after.opt.keys().collect::<Vec<_>>(),
        ran.stderr
    );
    assert!(
        temp_files(&host.opt).is_empty(),
        "temp files left: {:?}\n--- stderr\n{}",
        temp_files(&host.opt),
        ran.stderr
    );
}

/// The first log line containing every one of `words`.
pub fn log_line<'a>(ran: &'a Ran, words: &[&str]) -> &'a str {
    ran.stderr
        .lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no log line with {words:?}\n--- stderr\n{}", ran.stderr))
}
