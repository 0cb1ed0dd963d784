//! A host running the REAL `bin-proxy` against a real `bin-manager` (see
//! [`super::manager`]): a temp dir with a manifest managing one binary,
//! `app` at `DIR/opt/app` with `restart: none`, and a bounded run of the
//! agent with `--api`.

use super::host::Ran;
use super::{md5_hex, TempDir};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Longest a run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A managed host with the agent's manifest.
pub struct Agent {
    /// Everything lives here.
    pub dir: TempDir,
    /// The node name in its manifest.
    pub node: String,
}

/// What goes into the agent's manifest beyond the defaults.
#[derive(Default)]
pub struct Setup<'a> {
    /// `binaries[0].postUpgrade` (`{path}` stands for the binary's path).
    pub post_upgrade: Option<&'a str>,
    /// `node.labels` as a JSON object's text, e.g. `{"region":"eu"}`.
    pub labels: Option<&'a str>,
}

impl Agent {
    /// A host named `e2e-node` whose `opt/app` holds `initial`, recorded as installed.
    pub fn new(initial: &[u8]) -> Agent {
        Agent::with("e2e-node", Some(initial), Setup::default())
    }

    /// A host named `node`; `opt/app` holds `initial` (recorded as installed)
    /// or nothing.
    pub fn with(node: &str, initial: Option<&[u8]>, setup: Setup) -> Agent {
        let dir = TempDir::new();
        fs::create_dir_all(dir.join("opt")).unwrap();
        let path = dir.join("opt/app");
        if let Some(bytes) = initial {
            fs::write(&path, bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut extra = String::new();
        if let Some(cmd) = setup.post_upgrade {
            let cmd = cmd.replace("{path}", &path.display().to_string());
            extra.push_str(&format!(",\n      \"postUpgrade\": \"{cmd}\""));
        }
        let labels = setup
            .labels
            .map(|l| format!(",\n    \"labels\": {l}"))
            .unwrap_or_default();
        let manifest = format!(
            "{{\n  \"node\": {{\n    \"name\": \"{node}\",\n    \"cpuArch\": \"x86_64\",\n    \"osRelease\": \"Test OS 1\",\n    \"proxyVersion\": \"1.0.0\"{labels}\n  }},\n  \"binaries\": [\n    {{\n      \"name\": \"app\",\n      \"version\": \"latest\",\n      \"hash\": \"{}\",\n      \"path\": \"{}\",\n      \"restart\": \"none\"{extra}\n    }}\n  ]\n}}\n",
            initial.map(md5_hex).unwrap_or_default(),
            path.display()
        );
        fs::write(dir.join("manifest.json"), manifest).unwrap();
        Agent {
            dir,
            node: node.to_string(),
        }
    }

    /// The managed file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join("opt/app")
    }

    /// The managed file's bytes.
    pub fn target(&self) -> Vec<u8> {
        fs::read(self.path()).unwrap()
    }

    /// The real agent's command with `--api`, the token (if any) and no
    /// inherited settings or proxies.
    pub fn command(&self, api: &str, token: Option<&str>) -> Command {
        let mut cmd = Command::new(super::bin("bin-proxy"));
        cmd.arg("--config")
            .arg(self.dir.join("manifest.json"))
            .arg("--api")
            .arg(api)
            .arg("--timeout")
            .arg("20")
            .env_remove("BIN_PROXY_CONFIG")
            .env_remove("BIN_MANAGER_API")
            .env_remove("BIN_DOWNLOAD_URL")
            .env_remove("BIN_MANAGER_TOKEN")
            .env_remove("BIN_PROXY_SUPERVISORCTL");
        super::without_proxies(&mut cmd);
        if let Some(t) = token {
            cmd.env("BIN_MANAGER_TOKEN", t);
        }
        cmd
    }

    /// Runs the real agent (bounded: 60 s); returns (exit code, stderr).
    pub fn run(&self, api: &str, token: Option<&str>) -> (i32, String) {
        self.run_command(&mut self.command(api, token))
    }

    /// Runs `cmd` (from [`Agent::command`], changed) bounded: 60 s; returns
    /// (exit code, stderr).
    pub fn run_command(&self, cmd: &mut Command) -> (i32, String) {
        let ran = Ran::bounded(cmd, RUN_TIMEOUT, "bin-proxy");
        (ran.code, ran.stderr)
    }
}
