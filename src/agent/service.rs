//! Running other programs: hooks and restart commands, and the restart
//! policies (supervisord through [`supervisor`], a command, a signal to a
//! pid file, none). Always an argument list (never a shell), always with a
//! deadline, output captured for the error message, which names the
//! command.

use super::supervisor;
use crate::error::{Error, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a hook may take.
const HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// What it wrote to stdout.
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
}

impl Output {
    /// stdout and stderr, stdout first.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The last non-empty line of stderr, else of stdout (what a failing
    /// program usually says last about why).
    pub(super) fn last_line(&self) -> Option<&str> {
        fn last(t: &str) -> Option<&str> {
            t.lines().rev().map(str::trim).find(|l| !l.is_empty())
        }
        last(&self.stderr).or_else(|| last(&self.stdout))
    }
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
                                cmd: quoted(cmd),
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
                                cmd: quoted(cmd),
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
            cmd: quoted(cmd),
            msg: "is empty".into(),
        });
    }
    Ok(words)
}

fn quoted(cmd: &str) -> String {
    format!("\"{cmd}\"")
}

/// Runs `argv` with extra environment, killing it after `timeout`. Errors
/// name the command as `shown` (`postUpgrade "/x --check"`, or the argv).
pub fn run(
    argv: &[String],
    env: &[(&str, String)],
    timeout: Duration,
    shown: &str,
) -> Result<Output> {
    let shown = shown.to_string();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        // stdin is a pipe closed at once, not /dev/null: an empty container
        // root has no /dev.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Command {
            cmd: shown.clone(),
            msg: format!("could not start: {e}"),
        })?;
    // The child reads end of file.
    drop(child.stdin.take());
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
    // The drain threads only read and collect: they do not panic.
    let lossy = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(Output {
        code: status.code(),
        stdout: lossy(out.join().unwrap_or_default()),
        stderr: lossy(err.join().unwrap_or_default()),
    })
}

/// Runs a hook or restart command; `role` names it in errors
/// (`postUpgrade "/x --check" exited 1: <its last stderr line>`).
pub fn run_hook(role: &str, cmd: &str, env: &[(&str, String)]) -> Result<()> {
    let shown = format!("{role} {}", quoted(cmd));
    let out = run(&split(cmd)?, env, HOOK_TIMEOUT, &shown)?;
    match out.code {
        Some(0) => Ok(()),
        code => Err(Error::Command {
            cmd: shown,
            msg: failure(code, &out),
        }),
    }
}

/// `exited 3: <last line>` or `was killed by a signal`.
pub(super) fn failure(code: Option<i32>, out: &Output) -> String {
    let status = code.map_or("was killed by a signal".to_string(), |c| {
        format!("exited {c}")
    });
    match out.last_line() {
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
    /// `signal:HUP:/run/app.pid`: this signal to the pid in that file, no
    /// program run (for images without supervisord, or even `kill`);
    /// confirmed by the process (the one the file then names) staying alive.
    Signal {
        /// The signal number.
        signal: i32,
        /// The pid file.
        pidfile: std::path::PathBuf,
    },
}

impl Restart {
    /// The policy from the manifest's `restart` key (default: supervisor).
    /// The manifest was validated with [`Restart::parse`] when loaded.
    pub fn from_manifest(value: Option<&str>) -> Restart {
        Restart::parse(value).unwrap_or_else(|_| Restart::Command(value.unwrap_or("").into()))
    }

    /// The policy, or what is wrong with the value.
    pub fn parse(value: Option<&str>) -> Result<Restart, String> {
        let Some(v) = value.map(str::trim) else {
            return Ok(Restart::Supervisor);
        };
        let Some(spec) = v.strip_prefix("signal:") else {
            return Ok(match v {
                "supervisor" => Restart::Supervisor,
                "none" => Restart::Nothing,
                cmd => Restart::Command(cmd.to_string()),
            });
        };
        let usage = "must be \"signal:NAME:PIDFILE\", e.g. \"signal:HUP:/run/app.pid\"";
        let Some((name, pidfile)) = spec.split_once(':') else {
            return Err(usage.into());
        };
        let signal = crate::sys::signal_number(name)
            .ok_or_else(|| format!("{usage}: no signal named \"{name}\""))?;
        let pidfile = std::path::PathBuf::from(pidfile);
        if !pidfile.is_absolute() {
            return Err(format!("{usage}: the pid file must be an absolute path"));
        }
        Ok(Restart::Signal { signal, pidfile })
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
    /// Signalled; the text says which pid and how long it stayed up.
    Signalled(String),
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
        Restart::Command(cmd) => run_hook("restart", cmd, env).map(|()| Restarted::Commanded),
        Restart::Signal { signal, pidfile } => signal_restart(*signal, pidfile, window),
        Restart::Supervisor => supervisor::restart(service, window),
    }
}

/// Sends `signal` to the pid in `pidfile`, then watches for `window` that
/// the process the file names stays alive (an app that re-executes itself
/// keeps its pid; one restarted by something else writes a new one).
fn signal_restart(signal: i32, pidfile: &Path, window: Duration) -> Result<Restarted> {
    let name = crate::sys::signal_name(signal);
    let what = format!(
        "restart \"signal:{}:{}\"",
        name.trim_start_matches("SIG"),
        pidfile.display()
    );
    let fail = |msg: String| Error::Command {
        cmd: what.clone(),
        msg,
    };
    let pid = read_pid(pidfile).map_err(&fail)?;
    crate::sys::kill(pid, signal)
        .map_err(|e| fail(format!("cannot send {name} to pid {pid}: {e}")))?;
    let began = Instant::now();
    let mut current = pid;
    loop {
        std::thread::sleep(Duration::from_millis(200).min(window));
        // The file may name a new process by now; it must be alive.
        current = read_pid(pidfile).unwrap_or(current);
        if !alive(current) {
            return Err(fail(format!(
                "pid {current} is gone {:.1} s after {name}: the new build did not stay up",
                began.elapsed().as_secs_f32()
            )));
        }
        if began.elapsed() >= window {
            return Ok(Restarted::Signalled(format!(
                "sent {name} to pid {pid}, pid {current} running for {} s",
                window.as_secs()
            )));
        }
    }
}

fn read_pid(pidfile: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(pidfile)
        .map_err(|e| format!("cannot read pid file \"{}\": {e}", pidfile.display()))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 1)
        .ok_or_else(|| {
            format!(
                "pid file \"{}\" holds {:?}, not a pid",
                pidfile.display(),
                crate::protocol::one_line(text.trim(), 40)
            )
        })
}

/// Whether `pid` is a live process (not a zombie, where /proc can tell).
fn alive(pid: i32) -> bool {
    if crate::sys::kill(pid, 0).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true, // no /proc (an empty container root): kill(0) is all we know
    }
}

/// Asks, before anything is swapped, whether the service can be restarted
/// at all: supervisord up and knowing the program ([`Error::Supervisor`]
/// names what was tried and the fix), or for `signal:` the pid file naming
/// a live process. Otherwise a restart could only fail — and the build would
/// be blamed for it. Other policies, and hosts without supervisorctl, pass.
pub fn restart_ready(policy: &Restart, service: &str) -> Result<()> {
    if let Restart::Signal { signal, pidfile } = policy {
        // The process to signal must be there now: if it is not, the build
        // is not to blame for a restart that cannot happen.
        let what = || {
            format!(
                "restart \"signal:{}:{}\"",
                crate::sys::signal_name(*signal).trim_start_matches("SIG"),
                pidfile.display()
            )
        };
        let pid = read_pid(pidfile).map_err(|msg| Error::Command {
            cmd: what(),
            msg: format!("{msg} (is the app running?)"),
        })?;
        if !alive(pid) {
            return Err(Error::Command {
                cmd: what(),
                msg: format!(
                    "pid {pid} from \"{}\" is not running (is the app running?)",
                    pidfile.display()
                ),
            });
        }
        return Ok(());
    }
    match policy {
        Restart::Supervisor => supervisor::ready(service),
        _ => Ok(()),
    }
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
    fn restart_policies() {
        let parse = |v: &str| Restart::parse(Some(v));
        assert_eq!(Restart::parse(None), Ok(Restart::Supervisor));
        assert_eq!(parse("none"), Ok(Restart::Nothing));
        assert_eq!(
            parse("systemctl restart a"),
            Ok(Restart::Command("systemctl restart a".into()))
        );
        assert_eq!(
            parse("signal:HUP:/run/app.pid"),
            Ok(Restart::Signal {
                signal: 1,
                pidfile: "/run/app.pid".into()
            })
        );
        assert_eq!(
            parse("signal:sigusr2:/x.pid"),
            Ok(Restart::Signal {
                signal: crate::sys::signal_number("USR2").unwrap(),
                pidfile: "/x.pid".into()
            })
        );
        assert!(parse("signal:BOGUS:/x.pid")
            .unwrap_err()
            .contains("no signal named \"BOGUS\""));
        assert!(parse("signal:HUP:run/x.pid")
            .unwrap_err()
            .contains("absolute"));
        assert!(parse("signal:HUP")
            .unwrap_err()
            .contains("signal:NAME:PIDFILE"));
    }

    #[test]
    fn commands_run_with_deadline_and_output() {
        let ok = run(
            &split("sh -c 'echo out; echo err >&2; exit 3'").unwrap(),
            &[],
            Duration::from_secs(5),
            "test",
        )
        .unwrap();
        assert_eq!(ok.code, Some(3));
        assert_eq!(ok.text(), "out\nerr\n");
        let slow = run(
            &split("sleep 5").unwrap(),
            &[],
            Duration::from_millis(200),
            "slow",
        )
        .unwrap_err();
        assert_eq!(
            slow.to_string(),
            "slow did not finish within 0 s and was killed"
        );
        let e = run_hook("postUpgrade", "sh -c 'echo failing check; exit 4'", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "postUpgrade \"sh -c 'echo failing check; exit 4'\" exited 4: failing check"
        );
        // The last line of stderr, not of stdout.
        let e = run_hook(
            "postUpgrade",
            "sh -c 'echo why >&2; echo noise; exit 1'",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "postUpgrade \"sh -c 'echo why >&2; echo noise; exit 1'\" exited 1: why"
        );
        let e = run_hook("preUpgrade", "/nonexistent/hook", &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("preUpgrade \"/nonexistent/hook\" could not start: "),
            "{e}"
        );
    }
}
