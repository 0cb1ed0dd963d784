//! The repository's own scripts, run for real on this machine.
//!
//! `scripts/setup.sh` is the first thing a new user runs (through
//! `scripts/demo.sh`): it must exit 0 after installing what was missing — and
//! name the failing step when something fails. The fresh machine is made
//! safely: the package list is narrowed to one small Debian package
//! (`BIN_PROXY_SETUP_PACKAGES=hello`, removed first so that it really is
//! missing), and the script runs in a private mount namespace whose
//! `/etc/init.d` is an empty tmpfs, as on a machine without nginx or
//! supervisor's init scripts (the old script ended in
//! `[ -x /etc/init.d/nginx ] && …` and so exited 1 exactly there).

use testkit as common;

use std::process::{Command, Output};

const SETUP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh");
/// A tiny package with no dependencies beyond libc, used by nothing else.
const SMALL: &str = "hello";

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Runs setup.sh with only `packages` wanted, in a mount namespace whose
/// `/etc/init.d` is empty.
fn setup_on_a_fresh_machine(packages: &str) -> Output {
    // One apt run at a time (both tests share this process).
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _apt = APT.lock().unwrap_or_else(|e| e.into_inner());
    let script = format!("mount -t tmpfs none /etc/init.d && exec bash {SETUP}");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("BIN_PROXY_SETUP_PACKAGES", packages)
        .output()
        .expect("run unshare");
    eprintln!(
        "setup.sh ({packages}): {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn can_run_here() -> bool {
    common::can_run(
        common::is_root(),
        "scripts/setup.sh needs root (apt-get, mount namespaces)",
    ) && common::can_run(
        std::path::Path::new("/usr/bin/apt-get").exists()
            && std::path::Path::new("/usr/bin/unshare").exists(),
        "needs Debian's apt-get and util-linux's unshare",
    )
}

#[test]
fn setup_installs_a_missing_package_and_exits_0() {
    if !can_run_here() {
        return;
    }
    if installed(SMALL) {
        let out = Command::new("dpkg").args(["-r", SMALL]).output().unwrap();
        assert!(out.status.success(), "dpkg -r {SMALL}: {out:?}");
    }
    assert!(!installed(SMALL));

    let out = setup_on_a_fresh_machine(SMALL);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "setup.sh after installing");
    assert!(
        stdout.contains(&format!("setup: installing {SMALL}")),
        "{stdout}"
    );
    assert!(installed(SMALL), "{SMALL} is installed");
    let hello = Command::new("/usr/bin/hello").output().unwrap();
    assert!(String::from_utf8_lossy(&hello.stdout).contains("Hello, world!"));

    // Again: nothing is missing, nothing is installed, still exit 0.
    let out = setup_on_a_fresh_machine(SMALL);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("installing"));
}

#[test]
fn setup_names_the_step_that_failed() {
    if !can_run_here() {
        return;
    }
    let out = setup_on_a_fresh_machine("no-such-package-bin-proxy-test");
    assert_ne!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.starts_with("setup.sh: failed at line "))
        .unwrap_or_else(|| panic!("no line naming the failed step:\n{stderr}"));
    assert!(
        line.contains("install"),
        "names the apt-get install step: {line}"
    );
}
