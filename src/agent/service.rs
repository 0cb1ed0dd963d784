//! Running other programs: the supervisorctl restart and its RUNNING
//! confirmation, a custom restart command, and the pre/post upgrade hooks.
//! Always an argument list (never a shell), always with a deadline, output
//! captured for the error message.

use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a restart or status call may take.
const SUPERVISOR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a hook may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// stdout and stderr, stdout first.
    pub text: String,
}

/// Splits a command line into words: whitespace separates, single and double
/// quotes group, backslash escapes the next character outside single quotes.
/// No variables, globs or pipes — there is no shell.
pub fn split(cmd: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = cmd.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => {
                            return Err(Error::Command {
                                cmd: cmd.into(),
                                msg: "has an unclosed quote".into(),
                            })
                        }
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => w.extend(chars.next()),
                        Some(c) => w.push(c),
                        None => {
                            return Err(Error::Command {
                                cmd: cmd.into(),
                                msg: "has an unclosed quote".into(),
                            })
                        }
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    if words.is_empty() {
        return Err(Error::Command {
            cmd: cmd.into(),
            msg: "is empty".into(),
        });
    }
    Ok(words)
}

/// Runs `argv` with extra environment, killing it after `timeout`.
pub fn run(argv: &[String], env: &[(&str, String)], timeout: Duration) -> Result<Output> {
    let shown = argv.join(" ");
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            cmd: shown.clone(),
            msg: format!("could not start: {e}"),
        })?;
    // Drain both pipes on threads so that a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.by_ref().take(64 * 1024).read_to_end(&mut text);
                let _ = std::io::copy(&mut p, &mut std::io::sink());
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Command {
                    cmd: shown,
                    msg: format!(
                        "did not finish within {} s and was killed",
                        timeout.as_secs()
                    ),
                });
            }
            Err(e) => {
                return Err(Error::Command {
                    cmd: shown,
                    msg: format!("could not be waited for: {e}"),
                })
            }
        }
    };
    let mut text = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(&err.join().unwrap_or_default()));
    Ok(Output {
        code: status.code(),
        text,
    })
}

/// Runs a hook command; a non-zero exit is an error quoting its last output line.
pub fn run_hook(cmd: &str, env: &[(&str, String)]) -> Result<()> {
    let out = run(&split(cmd)?, env, HOOK_TIMEOUT)?;
    match out.code {
        Some(0) => Ok(()),
        code => Err(Error::Command {
            cmd: cmd.to_string(),
            msg: failure(code, &out.text),
        }),
    }
}

fn failure(code: Option<i32>, text: &str) -> String {
    let status = code.map_or("was killed by a signal".to_string(), |c| {
        format!("exited with status {c}")
    });
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(last) => format!("{status}: {}", crate::protocol::one_line(last, 200)),
        None => status,
    }
}

/// How a binary's service is restarted after a swap.
#[derive(Clone, Debug, PartialEq)]
pub enum Restart {
    /// `supervisorctl restart SERVICE`, confirmed by `status`.
    Supervisor,
    /// Nothing is restarted.
    Nothing,
    /// A command line, e.g. `systemctl restart myapp`.
    Command(String),
}

impl Restart {
    /// The policy from the manifest's `restart` key (default: supervisor).
    pub fn from_manifest(value: Option<&str>) -> Restart {
        match value.map(str::trim) {
            None | Some("supervisor") => Restart::Supervisor,
            Some("none") => Restart::Nothing,
            Some(cmd) => Restart::Command(cmd.to_string()),
        }
    }
}

/// What a restart did, for the log line.
#[derive(Debug, PartialEq)]
pub enum Restarted {
    /// Restarted and confirmed; the text is supervisor's status (`RUNNING pid 42, uptime 0:00:01`).
    Confirmed(String),
    /// Restarted by a custom command that exited 0.
    Commanded,
    /// Not restarted, and why (policy "none", no supervisorctl).
    Skipped(&'static str),
}

/// The supervisorctl command: `BIN_PROXY_SUPERVISORCTL` (e.g.
/// `supervisorctl -c /etc/supervisor/other.conf`), else `supervisorctl`.
pub fn supervisorctl() -> Result<Vec<String>> {
    match std::env::var("BIN_PROXY_SUPERVISORCTL") {
        Ok(cmd) if !cmd.trim().is_empty() => split(&cmd),
        _ => Ok(vec!["supervisorctl".to_string()]),
    }
}

/// Whether a program can be found (a path that exists, or a name on `PATH`).
pub fn exists(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Restarts a service by policy and confirms it runs for `window`.
pub fn restart(
    policy: &Restart,
    service: &str,
    window: Duration,
    env: &[(&str, String)],
) -> Result<Restarted> {
    match policy {
        Restart::Nothing => Ok(Restarted::Skipped("restart is \"none\"")),
        Restart::Command(cmd) => run_hook(cmd, env).map(|()| Restarted::Commanded),
        Restart::Supervisor => {
            let ctl = supervisorctl()?;
            if !exists(&ctl[0]) {
                return Ok(Restarted::Skipped("supervisorctl not found"));
            }
            supervisor_restart(&ctl, service)?;
            confirm_running(&ctl, service, window).map(Restarted::Confirmed)
        }
    }
}

fn supervisor(ctl: &[String], args: &[&str]) -> Result<Output> {
    let mut argv = ctl.to_vec();
    argv.extend(args.iter().map(|a| a.to_string()));
    run(&argv, &[], SUPERVISOR_TIMEOUT)
}

fn supervisor_restart(ctl: &[String], service: &str) -> Result<()> {
    let out = supervisor(ctl, &["restart", service])?;
    if out.code != Some(0) || !restart_succeeded(&out.text) {
        return Err(Error::Service {
            service: service.to_string(),
            msg: format!("restart failed: {}", failure(out.code, &out.text)),
        });
    }
    Ok(())
}

/// Reads `supervisorctl restart` output, because supervisor before 4.0 exits
/// 0 even on failure. Restart is stop + start: stopping a program that is not
/// running prints `ERROR (not running)` and is fine; success is a `started`
/// line and no other ERROR.
fn restart_succeeded(text: &str) -> bool {
    let started = text.lines().any(|l| l.trim_end().ends_with(": started"));
    let other_error = text.lines().any(|l| {
        l.contains("ERROR") && !l.contains("(not running)") || l.contains("no such process")
    });
    started && !other_error
}

/// How long a program may stay STARTING before it counts as failed.
const STARTING_LIMIT: Duration = Duration::from_secs(30);
/// How often `status` is asked during the watch window.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Confirms the restarted program runs: `status` must say RUNNING and keep
/// saying it, with the same pid, for the whole `window` (supervisor exits 0
/// for STARTING and BACKOFF, and a build that dies after supervisor's own
/// `startsecs` would otherwise pass). Returns the last status detail.
fn confirm_running(ctl: &[String], service: &str, window: Duration) -> Result<String> {
    let fail = |msg: String| Error::Service {
        service: service.to_string(),
        msg,
    };
    let began = Instant::now();
    let mut running: Option<(String, Instant)> = None; // (pid, since)
    loop {
        let out = supervisor(ctl, &["status", service])?;
        let Some((state, detail)) = parse_status(&out.text, service) else {
            return Err(fail(format!(
                "status did not report it: {}",
                failure(out.code, &out.text)
            )));
        };
        let detail = crate::protocol::one_line(detail, 200);
        match (state, &running) {
            ("RUNNING", None) => running = Some((pid_of(&detail), Instant::now())),
            ("RUNNING", Some((pid, _))) if *pid == pid_of(&detail) => {}
            ("RUNNING", Some((pid, since))) => {
                return Err(fail(format!(
                    "was restarted by supervisord {:.0?} after coming up (pid {pid} → {}): the new build keeps dying",
                    since.elapsed(),
                    pid_of(&detail)
                )));
            }
            ("STARTING", None) if began.elapsed() < STARTING_LIMIT => {}
            (state, None) => {
                return Err(fail(format!(
                    "is {state} after the restart, not RUNNING: {detail}"
                )))
            }
            (state, Some((_, since))) => {
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                return Err(fail(format!(
                    "stopped running {:.1} s after the restart ({state}{detail})",
                    since.elapsed().as_secs_f32()
                )));
            }
        }
        if let Some((_, since)) = &running {
            if since.elapsed() >= window {
                return Ok(format!("RUNNING {detail}").trim_end().to_string());
            }
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

/// The pid in a status detail (`pid 4242, uptime 0:00:05`), or "" when absent.
fn pid_of(detail: &str) -> String {
    detail
        .split_once("pid ")
        .map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).collect())
        .unwrap_or_default()
}

/// Finds `SERVICE  STATE  detail` in `supervisorctl status` output.
pub fn parse_status<'a>(text: &'a str, service: &str) -> Option<(&'a str, &'a str)> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let name = parts.next()?;
        // A group member shows as group:name.
        if name != service && name.rsplit(':').next() != Some(service) {
            return None;
        }
        let state = parts.next()?;
        let detail = line.split_once(state).map_or("", |(_, rest)| rest.trim());
        Some((state, detail))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting() {
        assert_eq!(split("a  b\tc").unwrap(), ["a", "b", "c"]);
        assert_eq!(
            split(r#"sh -c 'echo "hi there"' x"#).unwrap(),
            ["sh", "-c", "echo \"hi there\"", "x"]
        );
        assert_eq!(
            split(r#"a "b \" c" d\ e ''"#).unwrap(),
            ["a", "b \" c", "d e", ""]
        );
        assert!(split("a 'b").is_err());
        assert!(split("   ").is_err());
    }

    #[test]
    fn restart_outputs() {
        assert!(restart_succeeded("hello: stopped\nhello: started\n"));
        assert!(restart_succeeded(
            "hello: ERROR (not running)\nhello: started\n"
        ));
        assert!(!restart_succeeded(
            "hello: ERROR (not running)\nhello: ERROR (spawn error)\n"
        ));
        assert!(!restart_succeeded("hello: ERROR (no such process)\n"));
        assert!(!restart_succeeded(
            "hello: stopped\nhello: ERROR (abnormal termination)\n"
        ));
        assert!(!restart_succeeded(""));
    }

    #[test]
    fn pids() {
        assert_eq!(pid_of("pid 4242, uptime 0:00:05"), "4242");
        assert_eq!(pid_of("Exited too quickly"), "");
    }

    #[test]
    fn status_lines() {
        let out = "myapp                            RUNNING   pid 4242, uptime 0:00:05\n";
        assert_eq!(
            parse_status(out, "myapp"),
            Some(("RUNNING", "pid 4242, uptime 0:00:05"))
        );
        assert_eq!(
            parse_status("grp:myapp  BACKOFF  Exited too quickly", "myapp"),
            Some(("BACKOFF", "Exited too quickly"))
        );
        assert_eq!(
            parse_status("myapp: ERROR (no such process)", "myapp"),
            None
        );
        assert_eq!(parse_status("other RUNNING pid 1", "myapp"), None);
    }

    #[test]
    fn commands_run_with_deadline_and_output() {
        let ok = run(
            &split("sh -c 'echo out; echo err >&2; exit 3'").unwrap(),
            &[],
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(ok.code, Some(3));
        assert_eq!(ok.text, "out\nerr\n");
        let slow = run(&split("sleep 5").unwrap(), &[], Duration::from_millis(200)).unwrap_err();
        assert!(
            slow.to_string()
                .contains("did not finish within 0 s and was killed"),
            "{slow}"
        );
        let e = run_hook("sh -c 'echo failing check; exit 4'", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"sh -c 'echo failing check; exit 4'\" exited with status 4: failing check"
        );
        let e = run_hook("/nonexistent/hook", &[]).unwrap_err();
        assert!(e.to_string().contains("could not start"), "{e}");
    }
}
