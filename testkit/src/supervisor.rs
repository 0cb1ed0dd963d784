//! A real supervisord for integration tests (Debian package `supervisor`;
//! `scripts/setup.sh` installs it).
//!
//! [`Supervisor::start`] writes a config into a fresh, short-named directory
//! under `/tmp` (`/tmp/bpsv-PID-N`: the unix socket lives there, and socket
//! paths are limited to 108 bytes), starts `supervisord -c CONF` (it
//! daemonizes; its pidfile is in that directory) and waits, bounded, until
//! `supervisorctl -c CONF status` answers. Programs are given as
//! `(name, command, startsecs, autostart)`; every program also gets
//! `startretries=1` (a build that cannot start is FATAL within seconds, not
//! after supervisor's default back-off), `autorestart=unexpected`, and
//! `stopasgroup`/`killasgroup` so that nothing a program forked outlives it.
//!
//! Dropping a [`Supervisor`] (or [`Supervisor::stop`]) runs
//! `supervisorctl -c CONF shutdown`; if supervisord is still alive 5 s later
//! it is killed (SIGKILL, pid from the pidfile, checked to be a supervisord)
//! together with the process groups of its programs. No supervisord survives
//! a test. The directory is then removed unless `KEEP_TEST_DIRS` is set.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long supervisord may take to answer after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long supervisord may take to exit after `shutdown`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long one supervisorctl call may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One `[program:NAME]`: `(name, command, startsecs, autostart)`.
pub type Program<'a> = (&'a str, &'a str, u32, bool);

/// A running supervisord with its own config, socket and logs.
pub struct Supervisor {
    dir: PathBuf,
    conf: PathBuf,
    pidfile: PathBuf,
    supervisorctl: PathBuf,
    /// supervisord's pid, once its pidfile was read.
    pid: Option<u32>,
    stopped: bool,
    calls: AtomicUsize,
}

/// The absolute path of a real program (`/usr/bin`, `/usr/local/bin`, then
/// `PATH`); panics with a hint when it is not installed.
pub fn real_program(name: &str) -> PathBuf {
    let mut dirs = vec![PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: these tests need a real supervisord \
                 (Debian package `supervisor`; scripts/setup.sh installs it)"
            )
        })
}

impl Supervisor {
    /// Starts supervisord with these programs and waits until it answers.
    pub fn start(programs: &[Program]) -> Supervisor {
        let supervisord = real_program("supervisord");
        let supervisorctl = real_program("supervisorctl");
        let dir = unique_dir();
        let conf = dir.join("supervisord.conf");
        let pidfile = dir.join("supervisord.pid");
        fs::write(&conf, config(&dir, programs)).expect("write supervisord.conf");
        let mut sv = Supervisor {
            dir,
            conf,
            pidfile,
            supervisorctl,
            pid: None,
            stopped: false,
            calls: AtomicUsize::new(0),
        };
        // The foreground process forks the daemon and exits; the daemon
        // inherits a file (never a pipe), so waiting here cannot hang on it.
        let out = fs::File::create(sv.dir.join("supervisord.out")).expect("create supervisord.out");
        let status = Command::new(&supervisord)
            .arg("-c")
            .arg(&sv.conf)
            .current_dir(&sv.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup supervisord.out"))
            .stderr(out)
            .status()
            .expect("run supervisord");
        if !status.success() {
            sv.stopped = true; // nothing to shut down, but keep the diagnostics
            panic!(
                "supervisord -c {} failed ({status}):\n{}\n{}",
                sv.conf.display(),
                sv.read("supervisord.out"),
                sv.log()
            );
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        let last = loop {
            if sv.pid.is_none() {
                sv.pid = read_pid(&sv.pidfile);
            }
            let (code, text) = sv.ctl_code(&["status"]);
            // LSB codes: 0 all running, 3 some not running; 4/7 = cannot connect.
            let answers = matches!(code, Some(0) | Some(3))
                && programs.iter().all(|(name, ..)| text.contains(name));
            if answers && sv.pid.is_some() {
                return sv;
            }
            if Instant::now() >= deadline {
                break format!("exit {code:?}: {text}");
            }
            thread::sleep(Duration::from_millis(100));
        };
        panic!(
            "supervisord ({}) did not answer within {:?}; last `status`: {last}\n--- supervisord.out\n{}\n--- supervisord.log\n{}",
            sv.conf.display(),
            READY_TIMEOUT,
            sv.read("supervisord.out"),
            sv.log()
        );
    }

    /// The config file.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The directory holding the config, socket, pidfile and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// supervisord's pid (from its pidfile).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.pid
    }

    /// `/usr/bin/supervisorctl -c CONF`: the value for `BIN_PROXY_SUPERVISORCTL`.
    pub fn ctl_command(&self) -> String {
        format!(
            "{} -c {}",
            self.supervisorctl.display(),
            self.conf.display()
        )
    }

    /// Runs `supervisorctl -c CONF ARGS` (bounded); returns stdout then stderr.
    pub fn ctl(&self, args: &[&str]) -> String {
        self.ctl_code(args).1
    }

    /// Like [`ctl`](Self::ctl), with the exit code (`None`: killed or timed out).
    pub fn ctl_code(&self, args: &[&str]) -> (Option<i32>, String) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let out_path = self.dir.join(format!("ctl-{n}.out"));
        let out = match fs::File::create(&out_path) {
            Ok(f) => f,
            Err(e) => return (None, format!("cannot create {}: {e}", out_path.display())),
        };
        let err = out.try_clone().expect("dup ctl output");
        let child = Command::new(&self.supervisorctl)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => return (None, format!("cannot run supervisorctl: {e}")),
        };
        let deadline = Instant::now() + CTL_TIMEOUT;
        let code = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.code(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let text = fs::read_to_string(&out_path).unwrap_or_default();
        let _ = fs::remove_file(&out_path);
        (code, text)
    }

    /// The status line fields of `name`: (state, detail), if supervisord lists it.
    fn status_of(&self, name: &str) -> Option<(String, String)> {
        let text = self.ctl(&["status", name]);
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            if first != name && first.rsplit(':').next() != Some(name) {
                return None;
            }
            let state = words.next()?.to_string();
            let detail = words.collect::<Vec<_>>().join(" ");
            Some((state, detail))
        })
    }

    /// The pid supervisord reports for `name` (`pid N, uptime …`), if any.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let (_, detail) = self.status_of(name)?;
        let (_, rest) = detail.split_once("pid ")?;
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    }

    /// The state of `name` (`RUNNING`, `STARTING`, `BACKOFF`, `FATAL`, …), or
    /// `"? (OUTPUT)"` when supervisorctl did not list it.
    pub fn state(&self, name: &str) -> String {
        match self.status_of(name) {
            Some((state, _)) => state,
            None => format!("? ({})", self.ctl(&["status", name]).trim()),
        }
    }

    /// Polls until `name` is in `state`; false after `timeout`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.state(name) == state {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// supervisord's own log.
    pub fn log(&self) -> String {
        self.read("supervisord.log")
    }

    /// What program `name` wrote (stdout and stderr).
    pub fn program_log(&self, name: &str) -> String {
        self.read(&format!("{name}.log"))
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Whether supervisord is still alive.
    pub fn alive(&self) -> bool {
        self.pid.is_some_and(is_supervisord)
    }

    /// Shuts supervisord down (its programs are stopped first) and waits for
    /// it to exit; kills it after 5 s. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if self.pid.is_none() {
            self.pid = read_pid(&self.pidfile);
        }
        let _ = self.ctl_code(&["shutdown"]);
        let Some(pid) = self.pid else { return };
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while is_supervisord(pid) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if is_supervisord(pid) {
            let groups = children(pid);
            signal(&pid.to_string());
            for child in groups {
                signal(&format!("-{child}")); // its process group (supervisord setpgrp()s children)
            }
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while is_supervisord(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            assert!(
                !is_supervisord(pid),
                "supervisord pid {pid} survived SIGKILL"
            );
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("KEEP_TEST_DIRS").is_some() {
            eprintln!("KEEP_TEST_DIRS: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `/tmp/bpsv-PID-N`, created fresh (a stale one from a reused pid is removed).
fn unique_dir() -> PathBuf {
    loop {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/bpsv-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let _ = fs::remove_dir_all(&dir);
            }
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
}

fn config(dir: &Path, programs: &[Program]) -> String {
    let d = dir.display();
    let mut conf = format!(
        "[unix_http_server]\nfile={d}/s.sock\nchmod=0700\n\n\
         [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
         childlogdir={d}\nloglevel=info\nidentifier=bpsv\n\n\
         [rpcinterface:supervisor]\n\
         supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
         [supervisorctl]\nserverurl=unix://{d}/s.sock\n"
    );
    for (name, command, startsecs, autostart) in programs {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "program name {name:?}"
        );
        assert!(!command.contains('\n'), "program command {command:?}");
        conf.push_str(&format!(
            "\n[program:{name}]\ncommand={command}\nautostart={autostart}\nstartsecs={startsecs}\n\
             startretries=1\nautorestart=unexpected\nstopwaitsecs=3\nstopasgroup=true\n\
             killasgroup=true\nredirect_stderr=true\nstdout_logfile={d}/{name}.log\n"
        ));
    }
    conf
}

fn read_pid(pidfile: &Path) -> Option<u32> {
    fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// `/proc/PID/stat` after the command name: (state, ppid).
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut words = rest.split_whitespace();
    let state = words.next()?.chars().next()?;
    let ppid = words.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` is a live (not zombie) supervisord.
fn is_supervisord(pid: u32) -> bool {
    let live = stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X');
    live && fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("supervisord"))
        .unwrap_or(false)
}

/// The pids whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|&p| stat(p).is_some_and(|(_, ppid)| ppid == pid))
                .collect()
        })
        .unwrap_or_default()
}

/// `kill -KILL -- TARGET` (a pid, or `-PGID` for a process group).
fn signal(target: &str) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
