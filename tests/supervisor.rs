use testkit as common;

// The agent against a REAL supervisord (testkit/src/supervisor.rs): restart
// with `supervisorctl restart`, the RUNNING watch window, rollback when a
// build does not come up, quarantine, failure reports, and the resumption of
// an upgrade a killed run left between swap and confirmation.
//
// Each test has its own host (`testkit/src/host.rs`), its own fake
// bin-manager and its own supervisord managing program `app`, a small shell
// script at `opt/app`. Build N is `echo "build N"; exec sleep 100N`, so the
// pid supervisord reports is the script's and `/proc/PID/cmdline`
// (`sleep 100N`) tells which build is really running.
//
// `host.command()` puts a FAKE supervisorctl first on PATH and removes
// BIN_PROXY_SUPERVISORCTL; these tests set BIN_PROXY_SUPERVISORCTL to the
// real one (`/usr/bin/supervisorctl -c CONF`).

use common::host::{Host, Ran, NODE};
use common::supervisor::Supervisor;
use common::{json_string, md5_hex, temp_files, wait_until};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Build N: prints its number and keeps running as `sleep 100N`.
fn build(n: u32) -> Vec<u8> {
    format!("#!/bin/sh\necho \"build {n}\"; exec sleep {}\n", 1000 + n).into_bytes()
}

/// A build that exits at once with status 3.
const EXITS_AT_ONCE: &[u8] = b"#!/bin/sh\necho 'build 2: cannot start'; exit 3\n";
/// A build that passes supervisor's startsecs=1, then dies after 3 s.
const DIES_AFTER_3S: &[u8] = b"#!/bin/sh\necho 'build 2: dying soon'; sleep 3; exit 1\n";
/// Like [`DIES_AFTER_3S`], dying after 8 s: margin for the slip-through
/// demonstration (a 1 s window is confirmed about 3 s after the spawn).
const DIES_AFTER_8S: &[u8] = b"#!/bin/sh\necho 'build 2: dying later'; sleep 8; exit 1\n";

/// A host whose `opt/app` is run by a real supervisord.
struct Rig {
    host: Host,
    sv: Supervisor,
}

impl Rig {
    /// `opt/app` = build 1 (mode 0755), running under supervisord with this
    /// `startsecs`; the manifest records build 1 with the `extra` keys (raw
    /// JSON values); the server publishes `published`.
    fn new(startsecs: u32, extra: &[(&str, String)], published: &[u8]) -> Rig {
        let host = Host::new();
        let target = host.target("app");
        fs::write(&target, build(1)).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let command = target.display().to_string();
        let sv = Supervisor::start(&[("app", &command, startsecs, true)]);
        let rig = Rig { host, sv };
        assert!(
            rig.sv.wait_state("app", "RUNNING", Duration::from_secs(20)),
            "app did not come up under supervisord: {}\n{}",
            rig.sv.state("app"),
            rig.sv.log()
        );
        assert_eq!(rig.running_build(), Some(1));
        rig.write_manifest(extra);
        rig.host.server.publish("app", published);
        rig
    }

    fn target(&self) -> PathBuf {
        self.host.target("app")
    }

    fn backup(&self) -> PathBuf {
        self.host.opt.join("app.bak")
    }

    /// The manifest: `app` recorded as build 1, with the `extra` keys.
    fn write_manifest(&self, extra: &[(&str, String)]) {
        let mut fields = vec![
            "\"name\": \"app\"".to_string(),
            "\"version\": \"latest\"".to_string(),
            format!("\"hash\": \"{}\"", md5_hex(&build(1))),
            format!(
                "\"path\": {}",
                json_string(&self.target().display().to_string())
            ),
        ];
        fields.extend(
            extra
                .iter()
                .map(|(k, v)| format!("{}: {v}", json_string(k))),
        );
        self.host.write_manifest(&format!(
            "{{\n  \"node\": {{ \"name\": \"{NODE}\", \"cpuArch\": \"x86_64\", \"osRelease\": \"Test OS 1\", \"proxyVersion\": \"1.0.0\" }},\n  \"binaries\": [\n    {{\n      {}\n    }}\n  ]\n}}\n",
            fields.join(",\n      ")
        ));
    }

    /// The agent command, with the real supervisorctl.
    fn command(&self) -> Command {
        let mut cmd = self.host.command(&[]);
        cmd.env("BIN_PROXY_SUPERVISORCTL", self.sv.ctl_command());
        cmd
    }

    /// One agent run to completion (its log goes to stderr too with `SHOW_AGENT_LOG`).
    fn run(&self) -> Ran {
        let out = self.command().output().expect("run bin-proxy");
        if std::env::var_os("SHOW_AGENT_LOG").is_some() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Which build supervisord's `app` pid really runs (`sleep 100N` → N).
    fn running_build(&self) -> Option<u32> {
        let pid = self.sv.pid("app")?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let words: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        match words.as_slice() {
            [sleep, secs, ..] if sleep.ends_with("sleep") => {
                secs.parse::<u32>().ok().map(|s| s - 1000)
            }
            _ => None,
        }
    }

    /// Asserts `app` is RUNNING build `n`; returns its pid.
    fn assert_running(&self, n: u32) -> u32 {
        assert_eq!(
            self.sv.state("app"),
            "RUNNING",
            "supervisord log:\n{}",
            self.sv.log()
        );
        assert_eq!(self.running_build(), Some(n), "which build runs");
        self.sv.pid("app").unwrap()
    }

    fn file(&self) -> Vec<u8> {
        fs::read(self.target()).unwrap()
    }

    fn state_file(&self) -> String {
        let mut p = self.host.manifest.as_os_str().to_owned();
        p.push(".state");
        fs::read_to_string(PathBuf::from(p)).unwrap_or_default()
    }

    /// The `"pending": [...]` part of the state file (the upgrade journal).
    fn pending(&self) -> String {
        let state = self.state_file();
        match state.find("\"pending\"") {
            Some(i) => {
                let rest = &state[i..];
                rest[..rest.find(']').map_or(rest.len(), |j| j + 1)].to_string()
            }
            None => String::new(),
        }
    }

    fn downloads(&self) -> usize {
        self.host.server.count("GET", "/api/v1/download/app")
    }

    fn assert_no_temp_files(&self) {
        assert_eq!(temp_files(&self.host.opt), Vec::<String>::new());
    }

    /// Asserts the last keepalive body reports `hash` as a failure.
    fn assert_failure_reported(&self, hash: &str) {
        let body = self.host.server.registration(NODE).expect("registration");
        assert!(
            body.contains("\"failures\"") && body.contains(hash),
            "keepalive body lacks the failure of {hash}: {body}"
        );
    }

    /// A second run holds the failed build back: exit 0, no download, no restart.
    fn assert_held_back(&self) {
        let pid = self.sv.pid("app");
        let downloads = self.downloads();
        let ran = self.run();
        ran.expect_code(0).expect_log("holding back");
        assert_eq!(
            self.downloads(),
            downloads,
            "no download of a held-back build"
        );
        assert_eq!(self.sv.pid("app"), pid, "no restart");
        self.assert_no_temp_files();
    }
}

fn any_of(ran: &Ran, texts: &[&str]) {
    assert!(
        texts.iter().any(|t| ran.stderr.contains(t)),
        "log lacks any of {texts:?}\n--- stderr\n{}",
        ran.stderr
    );
}

fn confirm(secs: u64) -> (&'static str, String) {
    ("confirmSeconds", secs.to_string())
}

fn text(key: &'static str, value: &str) -> (&'static str, String) {
    (key, json_string(value))
}

#[test]
fn harness_starts_and_leaves_no_supervisord_behind() {
    let dir = common::TempDir::new();
    let script = dir.join("prog");
    fs::write(&script, build(7)).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let command = script.display().to_string();
    let mut sv = Supervisor::start(&[("prog", &command, 1, true), ("idle", &command, 1, false)]);
    assert!(sv.conf().to_string_lossy().len() < 60);
    assert!(sv.wait_state("prog", "RUNNING", Duration::from_secs(20)));
    assert_eq!(sv.state("idle"), "STOPPED");
    assert!(
        sv.state("nosuch").starts_with("? ("),
        "{}",
        sv.state("nosuch")
    );
    let pid = sv.pid("prog").unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(sv.ctl(&["restart", "prog"]).contains("prog: started"));
    assert_ne!(sv.pid("prog"), Some(pid));
    let child = sv.pid("prog").unwrap();
    assert!(sv.alive());
    let daemon = sv.daemon_pid().unwrap();
    let run_dir = sv.dir().to_path_buf();
    sv.stop();
    assert!(!sv.alive(), "supervisord {daemon} survived stop()");
    assert!(wait_until(Duration::from_secs(5), || !Path::new(&format!(
        "/proc/{child}"
    ))
    .exists()
        || fs::read_to_string(format!("/proc/{child}/stat"))
            .is_ok_and(|s| s.contains(") Z"))));
    assert!(sv.ctl(&["status"]).contains("no such file"));
    drop(sv);
    assert!(!run_dir.exists());
}

/// Case 1: Build 2 is published: swapped in, restarted by supervisord, confirmed.
#[test]
fn good_upgrade_restarts_and_confirms_the_new_build() {
    let rig = Rig::new(1, &[confirm(1)], &build(2));
    let before = rig.sv.pid("app").unwrap();
    let ran = rig.run();
    ran.expect_code(0)
        .expect_log("upgraded")
        .expect_log("RUNNING");
    let after = rig.assert_running(2);
    assert_ne!(before, after, "supervisord restarted the program");
    ran.expect_log(&format!("RUNNING pid {after}"));
    assert_eq!(rig.file(), build(2));
    assert_eq!(fs::read(rig.backup()).unwrap(), build(1));
    let manifest = rig.host.manifest_text();
    assert!(manifest.contains(&md5_hex(&build(2))), "{manifest}");
    assert_eq!(rig.host.server.reported("app"), [md5_hex(&build(2))]);
    let body = rig.host.server.registration(NODE).expect("registration");
    assert!(!body.contains("\"failures\""), "{body}");
    assert!(rig.sv.program_log("app").contains("build 2"));
    rig.assert_no_temp_files();
    assert!(
        !rig.pending().contains('{'),
        "journal closed: {}",
        rig.pending()
    );

    // Idle: nothing downloaded, nothing restarted.
    let ran = rig.run();
    ran.expect_code(0);
    assert_eq!(rig.downloads(), 1);
    assert_eq!(rig.sv.pid("app"), Some(after));
}

/// Case 2: A build that exits at once never becomes RUNNING: rolled back to build 1,
/// which runs again, and the failed hash is held back.
#[test]
fn build_that_exits_at_once_is_rolled_back_and_held_back() {
    let rig = Rig::new(1, &[confirm(1)], EXITS_AT_ONCE);
    let before = rig.sv.pid("app").unwrap();
    let bad = md5_hex(EXITS_AT_ONCE);
    let ran = rig.run();
    ran.expect_code(1)
        .expect_log("did not come up")
        .expect_log("rolled back");
    assert!(!ran.stderr.contains("upgraded"), "{}", ran.stderr);
    assert_eq!(rig.file(), build(1));
    let after = rig.assert_running(1);
    assert_ne!(before, after, "build 1 was restarted after the rollback");
    assert!(rig.host.manifest_text().contains(&md5_hex(&build(1))));
    assert!(!rig.host.manifest_text().contains(&bad));
    assert!(rig.host.server.reported("app").is_empty());
    rig.assert_failure_reported(&bad);
    assert!(rig.state_file().contains(&bad), "held back");
    rig.assert_no_temp_files();
    assert!(
        !rig.pending().contains('{'),
        "journal closed: {}",
        rig.pending()
    );

    rig.assert_held_back();
    rig.assert_running(1);
}

/// Case 3: A build that passes supervisor's startsecs and dies 3 s later is caught
/// by the agent's watch window (confirmSeconds 5).
#[test]
fn build_that_dies_after_startsecs_is_caught_by_the_watch_window() {
    let rig = Rig::new(1, &[confirm(5)], DIES_AFTER_3S);
    let bad = md5_hex(DIES_AFTER_3S);
    let ran = rig.run();
    ran.expect_code(1)
        .expect_log("did not come up")
        .expect_log("rolled back");
    any_of(&ran, &["stopped running", "keeps dying"]);
    assert_eq!(rig.file(), build(1));
    rig.assert_running(1);
    assert!(rig.host.server.reported("app").is_empty());
    rig.assert_failure_reported(&bad);
    rig.assert_no_temp_files();
    rig.assert_held_back();
}

/// Case 3b: Why the window matters: with confirmSeconds 1 the same kind of build
/// is confirmed before it dies, recorded and reported as installed.
#[test]
fn a_one_second_window_lets_a_build_that_dies_later_slip_through() {
    let rig = Rig::new(1, &[confirm(1)], DIES_AFTER_8S);
    let ran = rig.run();
    ran.expect_code(0).expect_log("upgraded");
    let pid = rig.sv.pid("app");
    assert!(pid.is_some());
    assert!(rig.host.manifest_text().contains(&md5_hex(DIES_AFTER_8S)));
    assert_eq!(rig.host.server.reported("app"), [md5_hex(DIES_AFTER_8S)]);
    // ...and then it dies: supervisord restarts it under a new pid, or gives up.
    assert!(
        wait_until(Duration::from_secs(20), || rig.sv.pid("app") != pid),
        "the build did not die: {}",
        rig.sv.state("app")
    );
}

/// Asserts a run that found supervisord unable to restart the service: exit
/// 1, one line naming supervisorctl, what it tried and the fix, nothing
/// downloaded or swapped, nothing held back or reported as failed.
fn assert_waiting_for_supervisord(rig: &Rig, ran: &Ran, says: &[&str]) {
    ran.expect_code(1)
        .expect_log("1 waiting (its service cannot be restarted now)");
    let lines: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|l| l.contains("supervisorctl"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line names supervisorctl:\n{}",
        ran.stderr
    );
    for text in says {
        assert!(lines[0].contains(text), "lacks {text:?}: {}", lines[0]);
    }
    assert!(lines[0].contains("not held back"), "{}", lines[0]);
    assert!(!ran.stderr.contains("did not come up"), "{}", ran.stderr);
    assert!(!ran.stderr.contains("rolled back"), "{}", ran.stderr);
    assert_eq!(rig.file(), build(1));
    assert!(!rig.backup().exists(), "nothing was swapped");
    assert_eq!(rig.downloads(), 0, "nothing was downloaded");
    assert!(
        !rig.state_file().contains(&md5_hex(&build(2))),
        "not held back: {}",
        rig.state_file()
    );
    if let Some(body) = rig.host.server.registration(NODE) {
        assert!(
            !body.contains("\"failures\""),
            "no failure reported: {body}"
        );
    }
    rig.assert_no_temp_files();
}

/// Case 4: A service name supervisord does not know: found by `supervisorctl
/// status` before anything is downloaded; the running build stays, the new
/// one is not held back, and once the manifest names the right program the
/// next run installs it.
#[test]
fn unknown_service_is_found_before_the_swap_and_not_blamed_on_the_build() {
    let rig = Rig::new(1, &[confirm(1), text("service", "nosuch")], &build(2));
    let before = rig.sv.pid("app").unwrap();
    let ran = rig.run();
    let conf = format!("config \"{}\"", rig.sv.conf().display());
    assert_waiting_for_supervisord(
        &rig,
        &ran,
        &[
            "status nosuch",
            "has no program \"nosuch\"",
            &conf,
            "[program:nosuch]",
        ],
    );
    assert_eq!(rig.assert_running(1), before, "app was not touched");

    rig.write_manifest(&[confirm(1)]);
    rig.run().expect_code(0).expect_log("upgraded");
    rig.assert_running(2);
}

/// Case 5: supervisord is down: found before the swap, named with the
/// socket supervisorctl tried; not held back, so the first run after
/// supervisord is back installs the build.
#[test]
fn supervisord_down_is_found_before_the_swap_and_the_next_run_installs() {
    let mut rig = Rig::new(1, &[confirm(1)], &build(2));
    rig.sv.stop();
    assert!(!rig.sv.alive());
    let ran = rig.run();
    let conf = format!("config \"{}\"", rig.sv.conf().display());
    let socket = rig.sv.dir().join("s.sock").display().to_string();
    assert_waiting_for_supervisord(
        &rig,
        &ran,
        &[
            "status app",
            "supervisord did not answer",
            &socket,
            &conf,
            "start it",
        ],
    );

    // supervisord is back (a fresh one running build 1).
    let command = rig.target().display().to_string();
    rig.sv = Supervisor::start(&[("app", &command, 1, true)]);
    assert!(rig.sv.wait_state("app", "RUNNING", Duration::from_secs(20)));
    let ran = rig.run();
    ran.expect_code(0).expect_log("upgraded");
    rig.assert_running(2);
    assert_eq!(rig.host.server.reported("app"), [md5_hex(&build(2))]);
}

/// Starts the agent with a `postUpgrade` hook that records its pid in
/// `marker` and sleeps; SIGKILLs the agent (and the hook) while the hook
/// sleeps, i.e. after the swap and the restart, before the commit. Returns
/// the log of the killed run.
fn run_and_kill_during_post_upgrade(rig: &Rig, marker: &Path) -> String {
    let log_path = rig.host.dir.join("killed-run.log");
    let log = fs::File::create(&log_path).unwrap();
    let mut child = rig
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn bin-proxy");
    let hooked = wait_until(Duration::from_secs(60), || {
        fs::read_to_string(marker).is_ok_and(|s| s.trim().parse::<u32>().is_ok())
    });
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let hook_pid = fs::read_to_string(marker).unwrap_or_default();
    if !hook_pid.trim().is_empty() {
        let _ = Command::new("kill")
            .args(["-KILL", hook_pid.trim()])
            .status();
    }
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    assert!(hooked, "the postUpgrade hook never ran ({status})\n{text}");
    assert_eq!(status.code(), None, "killed by a signal\n{text}");
    text
}

fn sleeping_hook(marker: &Path) -> (&'static str, String) {
    let m = marker.display();
    text(
        "postUpgrade",
        &format!("sh -c 'echo $$ > {m}.new && mv {m}.new {m} && exec sleep 60'"),
    )
}

/// Case 6: A run killed between swap and confirmation: the next run finds the
/// journal, confirms the new build under supervisord, records it.
#[test]
fn run_killed_after_swap_is_confirmed_by_the_next_run() {
    let rig = Rig::new(1, &[confirm(1)], &build(2));
    let marker = rig.host.dir.join("hook.pid");
    rig.write_manifest(&[confirm(1), sleeping_hook(&marker)]);
    let killed = run_and_kill_during_post_upgrade(&rig, &marker);
    assert!(killed.contains("installing"), "{killed}");
    assert!(!killed.contains("upgraded"), "{killed}");
    assert_eq!(rig.file(), build(2), "the swap happened");
    let hooked_pid = rig.assert_running(2);
    assert!(
        rig.pending().contains(&md5_hex(&build(2))),
        "journal: {}",
        rig.state_file()
    );
    assert!(
        rig.host.manifest_text().contains(&md5_hex(&build(1))),
        "not committed yet"
    );
    assert!(rig.host.server.reported("app").is_empty());

    rig.write_manifest(&[confirm(1)]); // the same, without the sleeping hook
    let ran = rig.run();
    ran.expect_code(0)
        .expect_log("interrupted after swapping in")
        .expect_log("confirming it now")
        .expect_log("RUNNING");
    let pid = rig.assert_running(2);
    assert_ne!(pid, hooked_pid, "confirmed by a fresh restart");
    assert_eq!(rig.file(), build(2));
    assert!(rig.host.manifest_text().contains(&md5_hex(&build(2))));
    assert_eq!(rig.host.server.reported("app"), [md5_hex(&build(2))]);
    assert_eq!(rig.downloads(), 1, "no second download");
    assert!(
        !rig.pending().contains('{'),
        "journal closed: {}",
        rig.pending()
    );
    rig.assert_no_temp_files();
}

/// Case 6b: The same, but the new build fails when the resuming run restarts it:
/// rolled back to build 1 and quarantined.
#[test]
fn run_killed_after_swap_of_a_failing_build_is_rolled_back_by_the_next_run() {
    // Build 2 runs until the flag exists; with it, it exits at once.
    let rig = Rig::new(1, &[confirm(1)], b"placeholder");
    let flag = rig.host.dir.join("broken");
    let flaky = format!(
        "#!/bin/sh\n[ -e {} ] && exit 3\necho \"build 2\"; exec sleep 1002\n",
        flag.display()
    )
    .into_bytes();
    rig.host.server.publish("app", &flaky);
    let bad = md5_hex(&flaky);
    let marker = rig.host.dir.join("hook.pid");
    rig.write_manifest(&[confirm(1), sleeping_hook(&marker)]);
    let killed = run_and_kill_during_post_upgrade(&rig, &marker);
    assert!(killed.contains("installing"), "{killed}");
    assert_eq!(rig.file(), flaky);
    assert!(
        rig.pending().contains(&bad),
        "journal: {}",
        rig.state_file()
    );

    fs::write(&flag, b"").unwrap();
    rig.write_manifest(&[confirm(1)]);
    let ran = rig.run();
    ran.expect_code(1)
        .expect_log("interrupted after swapping in")
        .expect_log("did not come up")
        .expect_log("rolled back");
    assert_eq!(rig.file(), build(1));
    rig.assert_running(1);
    assert!(rig.host.manifest_text().contains(&md5_hex(&build(1))));
    assert!(rig.host.server.reported("app").is_empty());
    rig.assert_failure_reported(&bad);
    assert!(
        !rig.pending().contains('{'),
        "journal closed: {}",
        rig.pending()
    );
    rig.assert_no_temp_files();
    rig.assert_held_back();
}

/// Case 7: The health check fails and the backup is gone: the agent refuses to
/// "roll back" to nothing, leaves the failed build in place, and does not
/// loop on the next run.
#[test]
fn missing_backup_cannot_be_rolled_back_and_does_not_loop() {
    let rig = Rig::new(1, &[confirm(1)], &build(2));
    let hook = "sh -c 'rm -f \"$BIN_PROXY_PATH.bak\"; echo health check failed; exit 1'";
    rig.write_manifest(&[confirm(1), text("postUpgrade", hook)]);
    let ran = rig.run();
    ran.expect_code(1)
        .expect_log("postUpgrade \"sh -c")
        .expect_log("exited 1: health check failed")
        .expect_log("CANNOT ROLL BACK")
        .expect_log("nothing was deleted");
    assert!(!ran.stderr.contains("rolled back to"), "{}", ran.stderr);
    assert_eq!(rig.file(), build(2), "the failed build stays");
    assert!(!rig.backup().exists());
    let pid = rig.assert_running(2);
    rig.assert_failure_reported(&md5_hex(&build(2)));
    rig.assert_no_temp_files();

    let ran = rig.run();
    ran.expect_code(0);
    assert_eq!(rig.downloads(), 1, "no second download\n{}", ran.stderr);
    assert_eq!(rig.sv.pid("app"), Some(pid), "no restart\n{}", ran.stderr);
    assert_eq!(rig.file(), build(2));
    assert!(
        rig.host.server.reported("app").is_empty(),
        "the failed build is reported as installed\n{}",
        ran.stderr
    );
    ran.expect_log("holding back");
}
