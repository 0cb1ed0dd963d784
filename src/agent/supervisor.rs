//! supervisord, through supervisorctl: whether it can restart a program at
//! all (asked before a swap), the restart, and the confirmation that the
//! program stays RUNNING with the same pid for the watch window. Errors name
//! the supervisorctl command, what it said and which supervisord it asked.

use super::service::{failure, run, split, Output, Restarted};
use crate::error::{Error, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a restart or status call may take.
const SUPERVISOR_TIMEOUT: Duration = Duration::from_secs(60);
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

/// `supervisorctl restart SERVICE`, then RUNNING for `window`. No
/// supervisorctl on this host: the swap stands, nothing is restarted.
pub fn restart(service: &str, window: Duration) -> Result<Restarted> {
    let ctl = supervisorctl()?;
    if !exists(&ctl[0]) {
        return Ok(Restarted::Skipped("supervisorctl not found"));
    }
    supervisor_restart(&ctl, service)?;
    confirm_running(&ctl, service, window).map(Restarted::Confirmed)
}

/// Whether supervisord can restart `service`: it answers, and knows the
/// program. [`Error::Supervisor`] names what was tried and the fix.
pub fn ready(service: &str) -> Result<()> {
    let ctl = supervisorctl()?;
    if !exists(&ctl[0]) {
        return Ok(());
    }
    let out = supervisor(&ctl, &["status", service])?;
    let text = out.text();
    if parse_status(&text, service).is_some() {
        return Ok(());
    }
    Err(Error::Supervisor {
        cmd: format!("{} status {service}", ctl.join(" ")),
        service: service.to_string(),
        unknown: text.contains("no such process"),
        said: crate::protocol::one_line(out.last_line().unwrap_or("nothing"), 200),
        config: config_of(&ctl),
    })
}

fn supervisor(ctl: &[String], args: &[&str]) -> Result<Output> {
    let mut argv = ctl.to_vec();
    argv.extend(args.iter().map(|a| a.to_string()));
    let shown = argv.join(" ");
    run(&argv, &[], SUPERVISOR_TIMEOUT, &shown)
}

fn supervisor_restart(ctl: &[String], service: &str) -> Result<()> {
    let out = supervisor(ctl, &["restart", service])?;
    if out.code != Some(0) || !restart_succeeded(&out.text()) {
        let mut msg = match out.code {
            Some(0) => format!(
                "exited 0 but did not report \"started\": {}",
                crate::protocol::one_line(out.last_line().unwrap_or("no output"), 200)
            ),
            code => failure(code, &out),
        };
        if out.text().contains("spawn error") {
            msg.push_str(&format!(
                " (why it did not start: `supervisorctl tail {service} stderr`, and supervisord's own log: `supervisorctl maintail`)"
            ));
        }
        return Err(Error::Command {
            cmd: format!("{} restart {service}", ctl.join(" ")),
            msg,
        });
    }
    Ok(())
}

/// Which supervisord the supervisorctl command talks to, for messages.
fn config_of(ctl: &[String]) -> String {
    let mut words = ctl.iter().skip(1);
    while let Some(w) = words.next() {
        let value = |flag: &str| w.strip_prefix(flag).map(str::to_string);
        match w.as_str() {
            "-c" | "--configuration" => {
                return format!("config \"{}\"", words.next().map_or("", |s| s))
            }
            "-s" | "--serverurl" => return format!("server {}", words.next().map_or("", |s| s)),
            _ => {}
        }
        if let Some(c) = value("--configuration=") {
            return format!("config \"{c}\"");
        }
        if let Some(u) = value("--serverurl=") {
            return format!("server {u}");
        }
    }
    "its default config (/etc/supervisor/supervisord.conf)".to_string()
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
        let text = out.text();
        let Some((state, detail)) = parse_status(&text, service) else {
            return Err(fail(format!(
                "status did not report it: {}",
                failure(out.code, &out)
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
fn parse_status<'a>(text: &'a str, service: &str) -> Option<(&'a str, &'a str)> {
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
    fn supervisor_configs() {
        let words = |s: &str| split(s).unwrap();
        assert_eq!(
            config_of(&words("supervisorctl -c /etc/s.conf")),
            "config \"/etc/s.conf\""
        );
        assert_eq!(
            config_of(&words("supervisorctl --configuration=/x")),
            "config \"/x\""
        );
        assert_eq!(
            config_of(&words("supervisorctl -s unix:///s.sock")),
            "server unix:///s.sock"
        );
        assert!(config_of(&words("supervisorctl")).starts_with("its default config"));
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
}
