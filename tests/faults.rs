use testkit as common;

// The operating system failing under a run, provoked for real: a full
// filesystem (tmpfs), fsync and rename failing (strace fault injection), a
// read-only target directory (bind mount), symlinks where the agent writes,
// set-id bits, file capabilities and xattrs, overlapping runs, and a run
// killed with SIGKILL mid-download. Each test checks what an operator would:
// exit code, the log line naming the problem, the managed file's bytes and
// mode, the manifest, and that no temp file is left beside the target.
//
// These tests need root, `mount`, `strace`, `setcap`/`getcap` (libcap2-bin)
// and `setfattr`/`getfattr` (attr). They fail (never skip) when one is
// missing: CI installs them through scripts/setup.sh.

use common::host::{Host, Ran};
use common::{md5_hex, mode, temp_files, wait_until, Fault};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const OLD: &[u8] = b"#!/bin/sh\necho old build\n";
const NEW: &[u8] = b"#!/bin/sh\necho new build, much better\n";

// ---------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------

/// Panics unless the tests run as root.
fn require_root() {
    let uid = fs::metadata("/proc/self").expect("stat /proc/self").uid();
    assert_eq!(
        uid, 0,
        "prerequisite missing: these fault tests must run as root (CI does), euid is {uid}"
    );
}

/// The full path of `tool`, from PATH or the sbin directories; panics naming
/// the Debian package when it is missing.
fn require_tool(tool: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(tool))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .unwrap_or_else(|| {
            panic!(
                "prerequisite missing: `{tool}` is not on PATH; install the Debian package \
                 `{package}` (scripts/setup.sh does)"
            )
        })
}

// ---------------------------------------------------------------------------
// Mounts that are always undone
// ---------------------------------------------------------------------------

/// A mount at `path`, unmounted on drop (also when the test panics). Declare
/// it after the `Host`, so that it is dropped (unmounted) before the host's
/// temp dir is removed.
struct Mount {
    path: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy (a child still in there): detach it lazily rather than leak it.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Runs `mount ARGS`, panicking loudly with its output when it fails.
fn run_mount(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("prerequisite missing: cannot run `mount`: {e}"));
    assert!(
        out.status.success(),
        "prerequisite missing: `mount {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts a fresh tmpfs of `size` at `dir`.
fn mount_tmpfs(dir: &Path, size: &str) -> Mount {
    require_root();
    let d = dir.to_str().unwrap();
    run_mount(&[
        "-t",
        "tmpfs",
        "-o",
        &format!("size={size},mode=0755"),
        "tmpfs",
        d,
    ]);
    Mount {
        path: dir.to_path_buf(),
    }
}

/// Makes `dir` read-only by bind-mounting it onto itself and remounting the
/// bind read-only.
fn mount_read_only(dir: &Path) -> Mount {
    require_root();
    let d = dir.to_str().unwrap();
    run_mount(&["--bind", d, d]);
    let guard = Mount {
        path: dir.to_path_buf(),
    };
    run_mount(&["-o", "remount,bind,ro", d]);
    guard
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn write_file(path: &Path, bytes: &[u8], file_mode: u32) {
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(file_mode)).unwrap();
}

/// A host managing `app` at `opt/app` holding `old` (mode 0755, recorded as
/// installed) with `new` published.
fn outdated_host(old: &[u8], new: &[u8]) -> Host {
    let host = Host::new();
    write_file(&host.target("app"), old, 0o755);
    host.manifest_for(&[("app", &md5_hex(old))]);
    host.server.publish("app", new);
    host
}

/// The exact `Host::command` invocation (program, arguments, environment),
/// run under `strace` with `strace_args`. strace exits with the agent's code.
fn under_strace(host: &Host, strace_args: &[&str]) -> Command {
    let strace = require_tool("strace", "strace");
    let agent = host.command(&[]);
    let mut cmd = Command::new(strace);
    cmd.args(strace_args)
        .arg("--")
        .arg(agent.get_program())
        .args(agent.get_args());
    for (key, value) in agent.get_envs() {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    cmd
}

/// The log with the strace trace appended, for assertion messages.
fn context(ran: &Ran, trace: &str) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}--- strace\n{}",
        ran.stdout, ran.stderr, trace
    )
}

/// The lines strace marked `(INJECTED)`.
fn injected(trace: &str) -> Vec<&str> {
    trace.lines().filter(|l| l.contains("INJECTED")).collect()
}

/// Panics unless the target still holds `bytes` with `file_mode`, the
/// manifest is byte-identical to `manifest`, nothing was reported as
/// installed, and no temp file is left in the target's directory.
fn assert_kept(
    host: &Host,
    target: &Path,
    bytes: &[u8],
    file_mode: u32,
    manifest: &str,
    log: &str,
) {
    assert!(
        fs::read(target).unwrap() == bytes,
        "{} no longer holds the old bytes (got {:?})\n{log}",
        target.display(),
        String::from_utf8_lossy(&fs::read(target).unwrap_or_default())
    );
    assert_eq!(
        mode(target),
        file_mode,
        "mode of {}\n{log}",
        target.display()
    );
    assert_eq!(
        host.manifest_text(),
        manifest,
        "the manifest changed\n{log}"
    );
    assert!(
        host.server.reported("app").is_empty(),
        "a hash was reported: {:?}\n{log}",
        host.server.reported("app")
    );
    let dir = target.parent().unwrap();
    assert!(
        temp_files(dir).is_empty(),
        "temp files left in {}: {:?}\n{log}",
        dir.display(),
        temp_files(dir)
    );
}

/// Panics unless the log has a line containing every one of `words`.
fn log_line<'a>(ran: &'a Ran, words: &[&str], extra: &str) -> &'a str {
    ran.stderr
        .lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| {
            panic!(
                "no log line with {words:?}\n--- stderr\n{}{extra}",
                ran.stderr
            )
        })
}

/// Output of a helper tool, panicking when it cannot run at all.
fn tool_output(tool: &Path, args: &[&str], path: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        (true, stdout)
    } else {
        (false, stdout + &String::from_utf8_lossy(&out.stderr))
    }
}

fn run_tool(tool: &Path, args: &[&str], path: &Path) {
    let (ok, out) = tool_output(tool, args, path);
    assert!(
        ok,
        "{} {} {} failed: {out}",
        tool.display(),
        args.join(" "),
        path.display()
    );
}

/// A body of `len` bytes that is not all one byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Case 1: the target's filesystem fills up mid-download.
#[test]
fn full_filesystem_keeps_the_old_file_and_leaves_no_temp() {
    let host = Host::new();
    let _tmpfs = mount_tmpfs(&host.opt, "1m");
    let target = host.target("app");
    write_file(&target, OLD, 0o755);
    host.manifest_for(&[("app", &md5_hex(OLD))]);
    host.server.publish("app", &pattern(4 << 20));
    let manifest = host.manifest_text();

    let ran = host.run(&[]);
    ran.expect_code(1);
    let line = log_line(&ran, &["app", "No space left on device"], "");
    assert!(line.contains("kept the running version"), "{line}");
    assert_kept(&host, &target, OLD, 0o755, &manifest, &ran.stderr);
    assert!(
        fs::symlink_metadata(host.target("app.bak")).is_err(),
        "a backup was made although nothing was installed\n{}",
        ran.stderr
    );
}

/// Case 2: fsync of the downloaded temp file fails with EIO.
#[test]
fn fsync_eio_on_the_download_keeps_the_old_file() {
    require_root();
    let host = outdated_host(OLD, NEW);
    let target = host.target("app");
    let manifest = host.manifest_text();
    let trace_path = host.dir.join("strace.log");

    let out = under_strace(
        &host,
        &[
            "-f",
            "-qq",
            "-y",
            "-o",
            trace_path.to_str().unwrap(),
            "-e",
            "trace=fsync,fdatasync",
            "-e",
            "inject=fsync:error=EIO:when=1",
        ],
    )
    .output()
    .expect("run strace");
    let ran = Ran::from(out);
    let trace = fs::read_to_string(&trace_path).unwrap_or_default();
    let ctx = context(&ran, &trace);

    // The injection hit the first fsync, and that was the download's temp file.
    let hit = injected(&trace);
    assert_eq!(hit.len(), 1, "expected one injected fsync\n{ctx}");
    assert!(
        hit[0].contains("dl.bin-proxy-tmp"),
        "the first fsync was not the downloaded temp file's: {}\n{ctx}",
        hit[0]
    );
    assert_eq!(ran.code, 1, "exit code\n{ctx}");
    let line = log_line(&ran, &["app", "Input/output error"], &ctx);
    assert!(line.contains("syncing"), "{line}");
    assert_kept(&host, &target, OLD, 0o755, &manifest, &ctx);
    assert!(
        fs::symlink_metadata(host.target("app.bak")).is_err(),
        "a backup was made although nothing was installed\n{ctx}"
    );
}

/// The renames of one run, in order, from a strace log: (from, to, the line).
fn renames(trace: &str) -> Vec<(String, String, String)> {
    trace
        .lines()
        .filter(|l| l.contains(" rename"))
        .map(|l| {
            let quoted: Vec<&str> = l.split('"').skip(1).step_by(2).collect();
            (
                quoted.first().unwrap_or(&"").to_string(),
                quoted.get(1).unwrap_or(&"").to_string(),
                l.to_string(),
            )
        })
        .collect()
}

/// Which rename of a run this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RenameKind {
    /// The backup link (a `.app.bak.…bak.bin-proxy-tmp` name) onto `opt/app.bak`.
    Backup,
    /// The downloaded temp file over `opt/app`.
    Target,
    /// Anything else (the state file with the crash journal, the manifest…).
    Other,
}

fn rename_kind(from: &str, to: &str) -> RenameKind {
    if to.ends_with("/opt/app.bak") && from.contains("/opt/.app.bak.") {
        RenameKind::Backup
    } else if to.ends_with("/opt/app") && from.contains("dl.bin-proxy-tmp") {
        RenameKind::Target
    } else {
        RenameKind::Other
    }
}

/// Runs the standard upgrade (`opt/app`: OLD → NEW) under strace tracing
/// renames, injecting EXDEV into the `nth` one (1-based) when given. Returns
/// the host, the manifest before the run, the run, the trace and a context
/// for assertion messages.
fn traced_upgrade(nth: Option<usize>) -> (Host, String, Ran, String, String) {
    require_root();
    let host = outdated_host(OLD, NEW);
    let manifest = host.manifest_text();
    let trace_path = host.dir.join("strace.log");
    let trace_path = trace_path.to_str().unwrap();
    let mut args = vec![
        "-f",
        "-qq",
        "-o",
        trace_path,
        "-e",
        "trace=rename,renameat,renameat2",
    ];
    let inject = nth.map(|n| format!("inject=rename,renameat,renameat2:error=EXDEV:when={n}"));
    if let Some(inject) = &inject {
        args.extend(["-e", inject.as_str()]);
    }
    let out = under_strace(&host, &args).output().expect("run strace");
    let ran = Ran::from(out);
    let trace = fs::read_to_string(trace_path).unwrap_or_default();
    let ctx = context(&ran, &trace);
    (host, manifest, ran, trace, ctx)
}

/// The kinds of the renames a clean upgrade makes, in order (a twin host,
/// traced without injection). The crash journal in the state file adds
/// renames before the swap, so the indices are looked up, not assumed.
fn rename_plan() -> Vec<RenameKind> {
    let (_host, _, ran, trace, ctx) = traced_upgrade(None);
    assert_eq!(ran.code, 0, "the clean traced upgrade failed\n{ctx}");
    let plan: Vec<RenameKind> = renames(&trace)
        .iter()
        .map(|(from, to, _)| rename_kind(from, to))
        .collect();
    let backup = plan.iter().position(|k| *k == RenameKind::Backup);
    let target = plan.iter().position(|k| *k == RenameKind::Target);
    assert!(
        matches!((backup, target), (Some(b), Some(t)) if b < t),
        "expected the backup rename before the rename over the target: {plan:?}\n{ctx}"
    );
    plan
}

/// Injects EXDEV into the first rename of `kind`; checks that exactly that
/// rename failed and what every failed swap must guarantee: exit 1, a log
/// line with the errno text, the old bytes and mode, the manifest, nothing
/// reported, no temp file. Returns the host, the run and the context.
fn rename_fails(kind: RenameKind) -> (Host, Ran, String) {
    let plan = rename_plan();
    let nth = plan.iter().position(|k| *k == kind).unwrap() + 1;
    let (host, manifest, ran, trace, ctx) = traced_upgrade(Some(nth));
    let hit = injected(&trace);
    assert_eq!(hit.len(), 1, "expected one injected rename\n{ctx}");
    let all = renames(&trace);
    let (from, to, line) = &all[nth - 1];
    assert!(
        line.contains("INJECTED"),
        "rename #{nth} was not the injected one\n{ctx}"
    );
    assert_eq!(rename_kind(from, to), kind, "rename #{nth}: {line}\n{ctx}");
    assert_eq!(ran.code, 1, "exit code\n{ctx}");
    log_line(&ran, &["app", "Invalid cross-device link"], &ctx);
    assert_kept(&host, &host.target("app"), OLD, 0o755, &manifest, &ctx);
    (host, ran, ctx)
}

/// Case 3a: the backup rename (the link onto `PATH.bak`) fails.
#[test]
fn rename_exdev_on_the_backup_keeps_the_old_file_and_makes_no_backup() {
    let (host, ran, ctx) = rename_fails(RenameKind::Backup);
    log_line(&ran, &["app", "keeping the old file as"], &ctx);
    // Outcome: no backup exists (the link was made under a temp name, which
    // is removed when its rename fails).
    let bak = host.target("app.bak");
    assert!(
        fs::symlink_metadata(&bak).is_err(),
        "{} exists after its rename failed\n{ctx}",
        bak.display()
    );
}

/// Case 3b: the rename of the new file over `PATH` fails.
#[test]
fn rename_exdev_over_the_target_keeps_the_old_file_and_its_backup() {
    let (host, ran, ctx) = rename_fails(RenameKind::Target);
    log_line(&ran, &["app", "renaming the new file over"], &ctx);
    // Outcome: the backup was already made; it is a second name of the
    // untouched old file, which is harmless.
    let (target, bak) = (host.target("app"), host.target("app.bak"));
    assert_eq!(fs::read(&bak).unwrap(), OLD, "{}\n{ctx}", bak.display());
    let (t, b) = (fs::metadata(&target).unwrap(), fs::metadata(&bak).unwrap());
    assert_eq!(
        (t.dev(), t.ino()),
        (b.dev(), b.ino()),
        "PATH.bak is expected to be a hard link to the untouched target\n{ctx}"
    );
}

/// Case 3c: any rename before the swap is complete (the crash journal's state
/// file, the backup, the target) failing leaves the old file in place.
#[test]
fn rename_exdev_anywhere_before_the_swap_keeps_the_old_file() {
    let plan = rename_plan();
    let last = plan.iter().position(|k| *k == RenameKind::Target).unwrap() + 1;
    for nth in 1..=last {
        let (host, manifest, ran, trace, ctx) = traced_upgrade(Some(nth));
        let ctx = format!("injecting into rename #{nth} of {plan:?}\n{ctx}");
        assert_eq!(injected(&trace).len(), 1, "{ctx}");
        assert_eq!(ran.code, 1, "exit code\n{ctx}");
        log_line(&ran, &["app", "Invalid cross-device link"], &ctx);
        assert_kept(&host, &host.target("app"), OLD, 0o755, &manifest, &ctx);
    }
}

/// Case 5: the managed path is a symlink into a subdirectory. README: the
/// link is followed, the file it points to is replaced, the link stays.
#[test]
fn symlinked_target_replaces_the_pointed_to_file_and_keeps_the_link() {
    let host = Host::new();
    let real_dir = host.opt.join("real");
    fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("app");
    write_file(&real, OLD, 0o750);
    let link = host.target("app");
    std::os::unix::fs::symlink("real/app", &link).unwrap();
    host.manifest_for(&[("app", &md5_hex(OLD))]);
    host.server.publish("app", NEW);

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "upgraded"], "");
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "opt/app is no longer a symlink\n{}",
        ran.stderr
    );
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("real/app"));
    assert_eq!(fs::read(&real).unwrap(), NEW, "{}", ran.stderr);
    assert_eq!(mode(&real), 0o750);
    assert_eq!(fs::read(real_dir.join("app.bak")).unwrap(), OLD);
    assert!(
        fs::symlink_metadata(host.target("app.bak")).is_err(),
        "a backup appeared beside the link instead of beside the file"
    );
    assert!(
        host.manifest_text().contains(&md5_hex(NEW)),
        "{}",
        host.manifest_text()
    );
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    assert!(
        temp_files(&real_dir).is_empty(),
        "{:?}",
        temp_files(&real_dir)
    );
}

/// Case 6: symlinks planted at the backup name and at temp names never make
/// the agent write through them.
#[test]
fn planted_symlinks_are_replaced_or_swept_never_followed() {
    let host = outdated_host(OLD, NEW);
    let outside = host.dir.join("outside");
    fs::create_dir(&outside).unwrap();
    let precious = outside.join("precious");
    let precious2 = outside.join("precious2");
    write_file(&precious, b"precious, do not touch\n", 0o644);
    write_file(&precious2, b"precious two\n", 0o600);
    let bak = host.target("app.bak");
    std::os::unix::fs::symlink(&precious, &bak).unwrap();
    let planted_dl = host.opt.join(".app.12345dl.bin-proxy-tmp");
    std::os::unix::fs::symlink(&precious2, &planted_dl).unwrap();
    let planted_bak = host.opt.join(".app.bak.54321bak.bin-proxy-tmp");
    let nowhere = outside.join("nothing-here");
    std::os::unix::fs::symlink(&nowhere, &planted_bak).unwrap();

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "removed 2 temp file"], "");
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);
    assert_eq!(mode(&host.target("app")), 0o755);
    assert_eq!(fs::read(&precious).unwrap(), b"precious, do not touch\n");
    assert_eq!(mode(&precious), 0o644);
    assert_eq!(fs::read(&precious2).unwrap(), b"precious two\n");
    assert_eq!(mode(&precious2), 0o600);
    assert!(
        fs::symlink_metadata(&nowhere).is_err(),
        "{:?} was created",
        nowhere
    );
    let meta = fs::symlink_metadata(&bak).unwrap();
    assert!(
        meta.file_type().is_file(),
        "opt/app.bak is not a regular file: {:?}",
        meta.file_type()
    );
    assert_eq!(fs::read(&bak).unwrap(), OLD);
    for planted in [&planted_dl, &planted_bak] {
        assert!(
            fs::symlink_metadata(planted).is_err(),
            "{} was not swept",
            planted.display()
        );
    }
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 2);
}

/// Case 7a: set-uid bit, a file capability and a user xattr survive an upgrade.
#[test]
fn setuid_capability_and_xattr_are_kept() {
    require_root();
    let setcap = require_tool("setcap", "libcap2-bin");
    let getcap = require_tool("getcap", "libcap2-bin");
    let setfattr = require_tool("setfattr", "attr");
    let getfattr = require_tool("getfattr", "attr");
    let host = outdated_host(OLD, NEW);
    let target = host.target("app");
    std::os::unix::fs::chown(&target, Some(0), Some(0)).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o4755)).unwrap();
    run_tool(&setcap, &["cap_net_bind_service+ep"], &target);
    run_tool(&setfattr, &["-n", "user.note", "-v", "keep"], &target);
    // Preconditions, so that a failure below is the agent's.
    assert_eq!(mode(&target), 0o4755);
    assert!(tool_output(&getcap, &[], &target)
        .1
        .contains("cap_net_bind_service=ep"));
    assert_eq!(
        tool_output(&getfattr, &["--only-values", "-n", "user.note"], &target).1,
        "keep"
    );

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(&target).unwrap(), NEW);
    let meta = fs::metadata(&target).unwrap();
    let mut problems = Vec::new();
    if (meta.uid(), meta.gid()) != (0, 0) {
        problems.push(format!(
            "owner {}:{} instead of 0:0",
            meta.uid(),
            meta.gid()
        ));
    }
    if meta.mode() & 0o7777 != 0o4755 {
        problems.push(format!("mode {:o} instead of 4755", meta.mode() & 0o7777));
    }
    let (_, caps) = tool_output(&getcap, &[], &target);
    if !caps.contains("cap_net_bind_service=ep") {
        problems.push(format!(
            "getcap shows {:?}, not cap_net_bind_service=ep",
            caps.trim()
        ));
    }
    let (ok, note) = tool_output(&getfattr, &["--only-values", "-n", "user.note"], &target);
    if !ok || note != "keep" {
        problems.push(format!("user.note is {:?}, not \"keep\"", note.trim()));
    }
    assert!(
        problems.is_empty(),
        "the new file lost the old one's attributes: {}\n--- stderr\n{}",
        problems.join("; "),
        ran.stderr
    );
    assert_eq!(fs::read(host.target("app.bak")).unwrap(), OLD);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 7b: a non-root owner and group and mode 0750 are kept.
#[test]
fn non_root_owner_and_mode_are_kept() {
    require_root();
    let host = outdated_host(OLD, NEW);
    let target = host.target("app");
    std::os::unix::fs::chown(&target, Some(1234), Some(1234)).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o750)).unwrap();

    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(&target).unwrap(), NEW);
    let meta = fs::metadata(&target).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 1234), "{}", ran.stderr);
    assert_eq!(meta.mode() & 0o7777, 0o750, "{}", ran.stderr);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 8: a second run while the first is mid-download exits 0 at once;
/// the first completes the upgrade.
#[test]
fn overlapping_run_exits_0_while_the_first_completes() {
    let body = pattern(50);
    let host = outdated_host(OLD, &body);
    host.server
        .fault("app", Fault::SlowDownload(Duration::from_millis(20)));
    let target = host.target("app");
    let mut first = host
        .command(&[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the first run");
    let downloading = wait_until(Duration::from_secs(10), || {
        host.server.count("GET", "/api/v1/download/") >= 1
    });
    if !downloading {
        let _ = first.kill();
        let ran = Ran::from(first.wait_with_output().unwrap());
        panic!("the first run never started downloading\n{}", ran.stderr);
    }

    let started = Instant::now();
    let second = host.run(&[]);
    let took = started.elapsed();
    let first_still_running = first.try_wait().unwrap().is_none();
    second.expect_code(0).expect_log("holds the lock");
    assert!(
        took < Duration::from_secs(2),
        "the second run took {took:?}"
    );
    assert!(
        first_still_running,
        "the first run ended before the second did: no overlap was tested"
    );
    assert_eq!(
        host.server.count("GET", "/api/v1/bins/"),
        1,
        "the second run talked to the server: {:?}",
        host.server.requests()
    );

    let first = Ran::from(first.wait_with_output().unwrap());
    first.expect_code(0);
    log_line(&first, &["app", "upgraded"], "");
    assert_eq!(fs::read(&target).unwrap(), body);
    assert_eq!(mode(&target), 0o755);
    assert_eq!(fs::read(host.target("app.bak")).unwrap(), OLD);
    assert!(host.manifest_text().contains(&md5_hex(&body)));
    assert_eq!(host.server.reported("app"), [md5_hex(&body)]);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// Case 9: a run killed with SIGKILL mid-download releases the lock; the
/// next run sweeps its temp file and completes the upgrade.
#[test]
fn run_killed_mid_download_releases_the_lock_and_is_swept() {
    let body = pattern(100);
    let host = outdated_host(OLD, &body);
    host.server
        .fault("app", Fault::SlowDownload(Duration::from_millis(100)));
    let target = host.target("app");
    let manifest = host.manifest_text();
    let mut child = host
        .command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the run");
    let tmp = host
        .opt
        .join(format!(".app.{}dl.bin-proxy-tmp", child.id()));
    // The agent's HTTP client fills a 64 KiB buffer before handing bytes
    // over, so the 100-byte temp file stays empty until the body is complete:
    // "mid-download" is the temp file existing while the server is still
    // sending (for 10 s: a byte per 100 ms), so it is killed at once.
    let downloading = wait_until(Duration::from_secs(10), || {
        fs::metadata(&tmp).is_ok() && host.server.count("GET", "/api/v1/download/") >= 1
    });
    child.kill().expect("kill -9");
    child.wait().unwrap();
    assert!(
        downloading,
        "the run never created {} ({:?})",
        tmp.display(),
        temp_files(&host.opt)
    );
    // Killed mid-download: the old file is untouched, the partial download remains.
    assert_eq!(fs::read(&target).unwrap(), OLD);
    assert_eq!(mode(&target), 0o755);
    assert_eq!(host.manifest_text(), manifest);
    assert!(fs::metadata(&tmp).is_ok(), "{:?}", temp_files(&host.opt));

    host.server.fault("app", Fault::None);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "removed 1 temp file"], "");
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(&target).unwrap(), body);
    assert_eq!(mode(&target), 0o755);
    assert_eq!(fs::read(host.target("app.bak")).unwrap(), OLD);
    assert!(host.manifest_text().contains(&md5_hex(&body)));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

// ---------------------------------------------------------------------------
// Files the agent touches: who else can write there, read-only mounts,
// directories switched mid-run
// ---------------------------------------------------------------------------

/// Runs the agent on `host` expecting it to refuse the upgrade for a
/// directory others could write; checks that nothing was downloaded or
/// changed. Returns the log line.
fn expect_refused(host: &Host, dir: &Path, why: &str) -> String {
    let target = host.target("app");
    let manifest = host.manifest_text();
    let before = fs::read(&target).unwrap();
    host.server.clear_requests();
    let ran = host.run(&[]);
    ran.expect_code(1);
    let line = log_line(
        &ran,
        &[
            "app",
            "refusing to replace it",
            &format!("directory \"{}\"", dir.display()),
            why,
        ],
        "",
    )
    .to_string();
    assert_eq!(
        host.server.count("GET", "/api/v1/download/"),
        0,
        "downloaded: {line}"
    );
    assert_eq!(fs::read(&target).unwrap(), before);
    assert_eq!(host.manifest_text(), manifest);
    assert!(fs::symlink_metadata(host.target("app.bak")).is_err());
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    line
}

/// Case 10: a managed path in a directory (or below one) that someone other
/// than root or the file's owner can write is refused before any download.
#[test]
fn a_directory_others_can_write_is_refused_and_nothing_is_downloaded() {
    require_root();
    let host = outdated_host(OLD, NEW);
    let chmod = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    for (m, shown) in [
        (0o777, "mode 0777"),
        (0o775, "mode 0775"),
        (0o1777, "mode 1777"),
    ] {
        chmod(&host.opt, m);
        expect_refused(
            &host,
            &host.opt,
            &format!("it is writable by group or others ({shown})"),
        );
    }
    chmod(&host.opt, 0o755);
    // A directory above it, world-writable without the sticky bit.
    chmod(&host.dir.path, 0o757);
    expect_refused(&host, &host.dir.path, "mode 0757");
    chmod(&host.dir.path, 0o755);
    // Owned by another user than root or the file's owner.
    std::os::unix::fs::chown(&host.opt, Some(1234), None).unwrap();
    expect_refused(
        &host,
        &host.opt,
        "owned by uid 1234, neither root nor the file's owner (uid 0)",
    );
    // The file's owner may own its directory: upgraded.
    std::os::unix::fs::chown(host.target("app"), Some(1234), Some(1234)).unwrap();
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(host.target("app")).unwrap(), NEW);
    std::os::unix::fs::chown(&host.opt, Some(0), None).unwrap();

    // A symlink's target in an unsafe directory: refused, the link's own
    // directory being fine does not help.
    let host = Host::new();
    let elsewhere = host.dir.join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    write_file(&elsewhere.join("app"), OLD, 0o755);
    std::os::unix::fs::symlink(elsewhere.join("app"), host.target("app")).unwrap();
    host.manifest_for(&[("app", &md5_hex(OLD))]);
    host.server.publish("app", NEW);
    chmod(&elsewhere, 0o777);
    expect_refused(&host, &elsewhere, "mode 0777");
    assert_eq!(fs::read(elsewhere.join("app")).unwrap(), OLD);
}

/// Case 4: the target directory is a read-only mount: one clear failure,
/// no download, no backup; later runs hold the build back without
/// downloading; a new build or a writable directory brings it back.
#[test]
fn a_read_only_target_fails_once_and_is_not_downloaded_again() {
    let host = outdated_host(OLD, NEW);
    let target = host.target("app");
    let manifest = host.manifest_text();
    let ro = mount_read_only(&host.opt);
    assert!(
        fs::write(host.opt.join("probe"), b"x").is_err(),
        "the read-only bind mount is writable"
    );

    let ran = host.run(&[]);
    ran.expect_code(1);
    let line = log_line(
        &ran,
        &[
            "ERROR app:",
            "cannot be replaced",
            "read-only mount",
            "Read-only file system",
        ],
        "",
    );
    assert!(
        line.contains("is not downloaded again until a new build is published"),
        "{line}"
    );
    assert_kept(&host, &target, OLD, 0o755, &manifest, &ran.stderr);
    assert!(fs::symlink_metadata(host.target("app.bak")).is_err());
    assert_eq!(host.server.count("GET", "/api/v1/download/"), 0);

    for _ in 0..2 {
        let ran = host.run(&[]);
        ran.expect_code(0);
        log_line(&ran, &["WARN app: holding back", "read-only mount"], "");
        log_line(&ran, &["1 held back"], "");
    }
    assert_eq!(
        host.server.count("GET", "/api/v1/download/"),
        0,
        "downloaded again"
    );

    // A new build is tried once (and fails once) even while read-only.
    host.server.publish("app", NEWER);
    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(
        &ran,
        &["app", "a new build", "is published; trying again"],
        "",
    );
    log_line(&ran, &["ERROR app:", "cannot be replaced"], "");

    // Writable again: installed.
    drop(ro);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app", "can be replaced again"], "");
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(&target).unwrap(), NEWER);
    assert_eq!(host.server.count("GET", "/api/v1/download/"), 1);
}

const NEWER: &[u8] = b"#!/bin/sh\necho newer build\n";

/// Case 12: the target file is a (read-only) bind mount of its own, as a
/// container's volume makes it: rename cannot replace it, so it is refused
/// before downloading, and no `.bak` copy is left.
#[test]
fn a_bind_mounted_target_file_is_refused_without_a_backup_copy() {
    require_root();
    let host = outdated_host(OLD, NEW);
    let target = host.target("app");
    let source = host.dir.join("volume-app");
    write_file(&source, OLD, 0o755);
    run_mount(&["--bind", source.to_str().unwrap(), target.to_str().unwrap()]);
    let _bind = Mount {
        path: target.clone(),
    };
    run_mount(&["-o", "remount,bind,ro", target.to_str().unwrap()]);
    let manifest = host.manifest_text();

    let ran = host.run(&[]);
    ran.expect_code(1);
    log_line(&ran, &["ERROR app:", "is a mount point of its own"], "");
    assert_kept(&host, &target, OLD, 0o755, &manifest, &ran.stderr);
    assert!(
        fs::symlink_metadata(host.target("app.bak")).is_err(),
        "a .bak copy was left"
    );
    assert_eq!(host.server.count("GET", "/api/v1/download/"), 0);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(&ran, &["app: holding back", "mount point"], "");
    assert_eq!(host.server.count("GET", "/api/v1/download/"), 0);
}

/// Points `link` at `to` atomically (a new link renamed over the old one),
/// as a deploy that switches `current` does.
fn switch_link(link: &Path, to: &str) {
    let tmp = link.with_extension("switching");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp).unwrap();
    fs::rename(&tmp, link).unwrap();
}

/// Case 13: the managed path's directory is a symlink switched to another
/// directory mid-run. The swap is refused naming the change (nothing
/// replaced in either directory, the temp file removed); a run killed after
/// such a switch leaves its temp file in the old directory, and the next
/// run sweeps it there, saying why.
#[test]
fn a_directory_switched_mid_run_is_named_and_its_temp_file_swept() {
    let host = Host::new();
    let (v1, v2) = (host.opt.join("v1"), host.opt.join("v2"));
    for d in [&v1, &v2] {
        fs::create_dir(d).unwrap();
        write_file(&d.join("app"), OLD, 0o755);
    }
    let current = host.opt.join("current");
    std::os::unix::fs::symlink("v1", &current).unwrap();
    let managed = current.join("app");
    host.write_manifest(&format!(
        r#"{{"node":{{"name":"n"}},"binaries":[{{"name":"app","hash":"{}","path":"{}","restart":"none"}}]}}"#,
        md5_hex(OLD),
        managed.display()
    ));
    let body = pattern(100);
    host.server.publish("app", &body);
    host.server
        .fault("app", Fault::SlowDownload(Duration::from_millis(20)));
    let in_v1 = || temp_files(&v1).iter().any(|t| t.starts_with(".app."));

    // Switched while downloading: refused at the swap, named.
    let child = host
        .command(&[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the run");
    let downloading = wait_until(Duration::from_secs(10), || {
        in_v1() && host.server.count("GET", "/api/v1/download/") >= 1
    });
    switch_link(&current, "v2");
    let ran = Ran::from(child.wait_with_output().unwrap());
    assert!(downloading, "never saw the download start\n{}", ran.stderr);
    ran.expect_code(1);
    log_line(
        &ran,
        &[
            "ERROR app:",
            &format!(
                "the directory of \"{}\" changed during the run",
                managed.display()
            ),
            &format!(
                "it led to \"{}\", now to \"{}\"; nothing replaced",
                v1.display(),
                v2.display()
            ),
        ],
        "",
    );
    for d in [&v1, &v2] {
        assert_eq!(fs::read(d.join("app")).unwrap(), OLD, "{}", d.display());
        assert!(
            temp_files(d).is_empty(),
            "{}: {:?}",
            d.display(),
            temp_files(d)
        );
        assert!(fs::symlink_metadata(d.join("app.bak")).is_err());
    }

    // Killed after a switch: the next run sweeps the old directory.
    switch_link(&current, "v1");
    let mut child = host
        .command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the run");
    host.server.clear_requests();
    let downloading = wait_until(Duration::from_secs(10), || {
        in_v1() && host.server.count("GET", "/api/v1/download/") >= 1
    });
    switch_link(&current, "v2");
    child.kill().expect("kill -9");
    child.wait().unwrap();
    assert!(downloading, "never saw the second download start");
    assert!(
        in_v1(),
        "the killed run left no temp file in v1: {:?}",
        temp_files(&v1)
    );

    host.server.fault("app", Fault::None);
    let ran = host.run(&[]);
    ran.expect_code(0);
    log_line(
        &ran,
        &[
            "app: removed 1 temp file(s) an interrupted run left in",
            &format!("\"{}\"", v1.display()),
            &format!("it leads to \"{}\" now", v2.display()),
        ],
        "",
    );
    log_line(&ran, &["app", "upgraded"], "");
    assert_eq!(fs::read(v2.join("app")).unwrap(), body);
    assert_eq!(fs::read(v1.join("app")).unwrap(), OLD);
    assert!(temp_files(&v1).is_empty(), "{:?}", temp_files(&v1));
    assert!(temp_files(&v2).is_empty(), "{:?}", temp_files(&v2));
}
