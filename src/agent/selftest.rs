//! The agent updating itself. `bin-proxy` may list its own executable in
//! its manifest like any binary (`restart: none`). Before a new agent is
//! renamed over the running one it is **run**: `NEW self-test --manifest M
//! --state S`, with a timeout; it must start, parse this manifest and this
//! state file, and print its version. One that does not is held back
//! (quarantined like a build that failed its health check) and reported; the
//! host never loses a working agent. The previous agent stays as `PATH.bak`
//! (the ordinary backup of every swap).

use super::manifest::Manifest;
use super::state::State;
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a new agent has to pass its self-test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `bin-proxy self-test --manifest M --state S`: what a new agent must pass.
pub fn self_test(manifest: &Path, state: &Path) -> Result<u8> {
    Manifest::load(manifest)?;
    State::load_strict(state).map_err(|msg| Error::Config {
        path: state.to_path_buf(),
        msg,
    })?;
    println!("bin-proxy {}", env!("CARGO_PKG_VERSION"));
    Ok(0)
}

/// Whether `target` is the executable running now.
pub fn is_self(target: &Path) -> bool {
    let (Ok(me), Ok(t)) = (
        std::env::current_exe().and_then(std::fs::canonicalize),
        std::fs::canonicalize(target),
    ) else {
        return false;
    };
    me == t
}

/// Runs the staged agent's self-test; its version line, or why it failed.
pub fn run_new(
    new: &Path,
    manifest: &Path,
    state: &Path,
    timeout: Duration,
) -> std::result::Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    // Staged files are 0600; the swap sets the final mode.
    std::fs::set_permissions(new, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot make it executable: {e}"))?;
    let mut child = Command::new(new)
        .arg("self-test")
        .arg("--manifest")
        .arg(manifest)
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("it does not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it did not finish within {} s", timeout.as_secs()));
            }
        }
    };
    let read = |r: Option<&mut dyn Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.take(64 * 1024).read_to_string(&mut s);
        }
        s
    };
    let out = read(child.stdout.as_mut().map(|r| r as &mut dyn Read));
    let err = read(child.stderr.as_mut().map(|r| r as &mut dyn Read));
    let version = out.lines().next().unwrap_or("").trim().to_string();
    if !status.success() {
        return Err(format!(
            "it exited with {status}: {}",
            crate::protocol::one_line(err.trim(), 300)
        ));
    }
    if !version.starts_with("bin-proxy ") {
        return Err(format!(
            "it did not print its version (printed \"{}\")",
            crate::protocol::one_line(&version, 100)
        ));
    }
    Ok(version)
}
